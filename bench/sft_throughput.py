"""Training throughput of `mathctl sft` against TRL's `SFTTrainer`, same model, same data, one process.

What is measured
    Tokens per second of the training loop: the non-padding input tokens of the micro-batches of the
    timed steps divided by the wall-clock seconds those steps took. The clock is read right after
    each optimiser step (a `torch.optim.Optimizer` step post-hook, registered the same way on both
    sides), so the window [end of step W, end of step N] covers steps W+1..N: forward, backward,
    clipping, optimiser and scheduler step, collation and whatever the trainer does per step.
    Model loading, tokenisation, the first W (warmup) steps and the final save are excluded.
    Tokens are counted from the examples each side's collator receives (sum of sample lengths), so
    padding is never counted, however a side lays out its batch.

What is kept the same
    The model folder (`tiny:PRESET`, built once and cached; loaded by both through mathctl's loader,
    fp32 weights, the same attention implementation), the conversations (the `quickstart-sft`
    recipe's synthetic problems rendered user=problem+suffix / assistant=solution with chatml), the
    trained tokens (assistant content + end-of-turn: mathctl `loss_on=assistant`, TRL
    prompt/completion conversational data with `completion_only_loss=True`), the samples of every
    optimiser step *and their order* (TRL gets the data in mathctl's StepPlan order and a
    sequential sampler), micro-batch size, max_seq_len, steps, AdamW (both fused: mathctl's
    default, and TRL's default `optim="adamw_torch_fused"`), lr, warmup + cosine
    schedule to 0.1 x lr, weight decay 0, grad clipping at 1.0, precision (fp32, or bf16 autocast
    over fp32 weights with `--precision bf16`), no gradient checkpointing (TRL's SFTConfig turns it
    on by default; it is switched off here as mathctl does not use it), one process.
    Each side runs in its own fresh subprocess, one after the other.

    Layout: mathctl packs a micro-batch padding-free into one row (sdpa per sample through its
    `mathctl_varlen` attention, or flash-attn varlen). TRL runs twice: `trl`, its defaults, pads to the
    longest sample of the micro-batch (`packing=False`, `padding_free=False`); `trl-pf`, its best
    padding-free setting, which TRL 1.x accepts only with packing (`padding_free=True, packing=True,
    packing_strategy="bfd"`; `padding_free` alone is a ValueError): best-fit-decreasing bins of up to
    the mean token count of mathctl's micro-batches, one bin per step, attention kept within each sample
    through the position ids. Its steps hold other samples than mathctl's (bfd reorders them), so tokens/s is
    the figure that compares. TRL runs with
    `report_to="none"`, `logging_strategy="no"`, `save_strategy="no"`, `eval_strategy="no"`,
    `disable_tqdm=True`; mathctl with no eval rows, no intermediate checkpoints, one metrics line.

Run
    python bench/sft_throughput.py                    # CPU, tiny:qwen2-small, 40 steps, mathctl vs both TRL sides
    python bench/sft_throughput.py --json             # one JSON line instead of the table
    python bench/sft_throughput.py --repeats 3        # alternate the sides 3 times (default 2), keep each side's best
    python bench/sft_throughput.py --set train.packing=false   # mathctl with padded micro-batches instead
    python bench/sft_throughput.py --device cuda --preset qwen2.5-0.5b --precision bf16   # GPU, with MFU

Needs TRL (`pip install trl`, listed in the project's optional extra `bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# --- options ----------------------------------------------------------------------------------
# trl: SFTTrainer's defaults (pad each micro-batch to its longest sample); trl-pf: its best padding-free
# setting, which TRL >= 1.x only accepts with packing (`padding_free=True, packing=True, packing_strategy="bfd"`)
SIDES = ("mathctl", "trl", "trl-pf")
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per side (default 40)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="samples per optimiser step (default 16)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per sample, longer ones truncated (default 256)")
    p.add_argument("--preset", default="qwen2-small", help="tiny model preset, used as tiny:PRESET (default qwen2-small)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the timing (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32, or bf16 autocast (default fp32)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense TFLOP/s of the device for MFU (default 989: H100 SXM bf16); used on cuda")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--only", choices=list(SIDES), default=None, help="run one side only (no ratio)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per side, alternating mathctl/TRL; each side's best run is reported (default 2)")
    p.add_argument("--trl-padding-free", action="store_true",
                   help="only TRL's padding-free side against mathctl (default: both TRL sides)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra mathctl recipe override, mathctl side only (e.g. train.packing=false); repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON line with both figures and the ratio")
    p.add_argument("--verbose", action="store_true", help="show the output of the two training runs")
    p.add_argument("--_side", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    if args.warmup_steps < 0 or args.micro_batch_size < 1 or args.max_seq_len < 8 or args.repeats < 1:
        p.error("--warmup-steps >= 0, --micro-batch-size >= 1, --max-seq-len >= 8 and --repeats >= 1 are required")
    return args


# --- shared set-up (runs inside each side's subprocess) ---------------------------------------
def build_config(args: argparse.Namespace, extra: list[str] | None = None):
    """The quickstart-sft recipe with the benchmark's sizes; no eval, no checkpoints, minimal logging."""
    from mathctl.core.config import load_recipe
    from mathctl.sft import SFTConfig

    overrides = [
        f"model.path=tiny:{args.preset}",
        f"train.micro_batch_size={args.micro_batch_size}",
        "train.grad_accum_steps=1",
        f"train.max_seq_len={args.max_seq_len}",
        f"train.max_steps={args.steps}",
        f"train.precision={args.precision}",
        "train.packing=true",
        "train.loss_on=assistant",
        "train.gradient_checkpointing=false",
        f"train.log_every_steps={args.steps}",
        "train.eval_every_steps=null",
        "data.eval_rows=0",
        # exactly the rows the run consumes (one epoch); problem i is the same whatever the count
        f"data.synthetic.num_problems={args.steps * args.micro_batch_size}",
        "output.save_every_steps=null",
        "output.save_hf_checkpoints=false",
        "output.plots=false",
        "launch.num_processes=1",
    ]
    if args.lr is not None:
        overrides.append(f"train.lr={args.lr}")
    cfg, _ = load_recipe("sft", SFTConfig, "quickstart-sft", overrides + list(extra or []))
    return cfg


class StepClock:
    """perf_counter after every optimiser step, and the non-padding tokens of every micro-batch."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.step_ends: list[float] = []
        self.batch_tokens: list[int] = []
        self.batch_padded: list[int] = []
        self.params = 0
        self.first_batch_time = 0.0  # set when the first micro-batch is collated

    def after_step(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def attach(self, optimizer) -> None:
        optimizer.register_step_post_hook(self.after_step)

    def count(self, examples: list[dict], padded: int) -> None:
        self.batch_tokens.append(sum(len(e["input_ids"]) for e in examples))
        self.batch_padded.append(padded)

    def result(self, warmup: int, steps: int) -> dict[str, Any]:
        if len(self.step_ends) != steps or len(self.batch_tokens) < steps:
            raise RuntimeError(f"timing hooks saw {len(self.step_ends)} optimiser steps and {len(self.batch_tokens)} "
                               f"micro-batches; expected {steps} of each")
        tokens = self.batch_tokens[:steps]  # a dataloader may collate one batch ahead
        if warmup:
            start = self.step_ends[warmup - 1]
        else:
            start = self.first_batch_time
        seconds = self.step_ends[-1] - start
        timed = sum(tokens[warmup:])
        steps_s = [b - a for a, b in zip([start] + self.step_ends[warmup:-1], self.step_ends[warmup:])]
        per_step = sorted(n / s for n, s in zip(tokens[warmup:], steps_s))
        return {
            "seconds": seconds, "tokens": timed, "tokens_per_s": timed / seconds,
            "padded_tokens": sum(self.batch_padded[warmup:steps]),
            "step_tokens": tokens,
            "timed_step_seconds": steps_s,
            # median over the timed steps of tokens/s of each step: less sensitive to a noisy machine
            "median_step_tokens_per_s": per_step[len(per_step) // 2],
            "params": self.params,
        }


def step_order(cfg, tokenizer) -> tuple[list[list[dict]], list[list[int]]]:
    """The conversations mathctl trains on and, per optimiser step, the indices into them (mathctl's order)."""
    from mathctl.sft import IGNORE, load_rows, row_to_messages, tokenize_conversation
    from mathctl.training import StepPlan

    rows = load_rows(cfg.data.source, synthetic=cfg.data.synthetic)
    conversations = [row_to_messages(row, cfg.data, i) for i, row in enumerate(rows)]
    # prepare_examples drops rows without a trained token; with eval_rows=0 the rest keep their order
    kept = [i for i, m in enumerate(conversations)
            if any(t != IGNORE for t in tokenize_conversation(m, tokenizer, cfg.train.loss_on, cfg.train.max_seq_len)["labels"][1:])]
    plan = StepPlan(len(kept), cfg.train, 1, cfg.data.shuffle_seed)
    steps = [[kept[i] for i in plan.step_indices(s)] for s in range(plan.total_steps)]
    return conversations, steps


# --- mathctl side -----------------------------------------------------------------------------
def side_mathctl(args: argparse.Namespace) -> dict[str, Any]:
    import mathctl.sft as sft
    from mathctl import training
    from mathctl.core.config import dump_yaml
    from mathctl.core.rundir import RunDir

    cfg = build_config(args, args.overrides)
    clock = StepClock(cuda=args.device == "cuda")

    # Observe, do not change: wrap the optimiser factory (post-step hook) and the collator (token counts).
    build_optimizer, collate = training.build_optimizer, sft.collate

    def build_optimizer_timed(model, train):
        optimizer = build_optimizer(model, train)
        clock.params = sum(p.numel() for p in model.parameters())
        clock.attach(optimizer)
        return optimizer

    def collate_counted(examples, **kwargs):
        if not clock.batch_tokens:
            clock.first_batch_time = time.perf_counter()
        batch = collate(examples, **kwargs)
        clock.count(examples, int(batch["input_ids"].numel()))
        return batch

    training.build_optimizer, sft.collate = build_optimizer_timed, collate_counted
    with tempfile.TemporaryDirectory(prefix="bench-sft-mathctl-") as tmp:
        run_dir = RunDir.create(Path(tmp) / "run", recipe_yaml=dump_yaml(cfg), step="sft", resume=False,
                                seeds=cfg.seeds())
        summary = sft.run(cfg, run_dir)
    out = clock.result(args.warmup_steps, args.steps)
    out["own_tokens_per_s"] = summary.get("tokens_per_s")  # mathctl's figure (all steps, one window)
    out["attn_implementation"] = _attn(cfg, args)
    return out


def _attn(cfg, args) -> str:
    from mathctl import models

    return models.pick_attn_implementation(cfg.model.attn_implementation, args.device)


# --- TRL side ---------------------------------------------------------------------------------
def side_trl(args: argparse.Namespace, padding_free: bool = False) -> dict[str, Any]:
    """TRL's SFTTrainer on the same model, conversations and schedule. `padding_free`: TRL's padding-free
    layout, which it only offers with packing: best-fit-decreasing bins of up to the mean token count of mathctl's
    micro-batches, one bin per step (mathctl packs a micro-batch into one row), so the steps hold other samples
    than mathctl's (bfd reorders them) and tokens/s is what compares."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from mathctl import models, training

    cfg = build_config(args)
    training.set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model)  # chatml installed, pad token set: as mathctl sees it
    conversations, steps = step_order(cfg, tokenizer)
    ordered = [conversations[i] for step in steps for i in step]
    for messages in ordered:
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise RuntimeError("expected user/assistant conversations")
    dataset = Dataset.from_list([{"prompt": m[:1], "completion": m[1:]} for m in ordered])
    model = models.load_causal_lm(cfg.model, device_type=args.device)
    clock = StepClock(cuda=args.device == "cuda")
    clock.params = sum(p.numel() for p in model.parameters())
    t = cfg.train

    with tempfile.TemporaryDirectory(prefix="bench-sft-trl-") as tmp:
        layout = dict(per_device_train_batch_size=t.micro_batch_size, max_length=t.max_seq_len, packing=False,
                      padding_free=False)
        if padding_free:  # bins the size of mathctl's mean micro-batch, so a step holds about the same tokens
            from mathctl.sft import tokenize_conversation

            lengths = [min(len(tokenize_conversation(m, tokenizer, t.loss_on, t.max_seq_len)["input_ids"]), t.max_seq_len)
                       for m in ordered]
            bin_tokens = max(t.max_seq_len, round(sum(lengths) / len(steps)))
            layout = dict(per_device_train_batch_size=1, max_length=bin_tokens, packing=True, packing_strategy="bfd",
                          padding_free=True)
        targs = TRLConfig(
            output_dir=tmp, seed=t.seed, **layout, gradient_accumulation_steps=1, max_steps=t.max_steps,
            learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
            adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm or 0.0, optim="adamw_torch_fused",
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
            warmup_steps=t.warmup_steps,
            bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False,
            use_cpu=args.device == "cpu", dataloader_num_workers=0, dataloader_pin_memory=args.device == "cuda",
            completion_only_loss=True,
            train_sampling_strategy="sequential", shuffle_dataset=False,
            report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        )

        class Hook(TrainerCallback):
            def on_train_begin(self, args_, state, control, optimizer=None, **kwargs):
                clock.attach(getattr(optimizer, "optimizer", optimizer))  # under accelerate's wrapper

        trainer = SFTTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Hook()])
        collator = trainer.data_collator

        def collate_counted(examples):
            if not clock.batch_tokens:
                clock.first_batch_time = time.perf_counter()
            batch = collator(examples)
            clock.count(examples, int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = collate_counted
        trainer.train()
    out = clock.result(args.warmup_steps, args.steps)
    out["attn_implementation"] = model.config._attn_implementation
    out["trl_version"] = __import__("trl").__version__
    return out


# --- driver -----------------------------------------------------------------------------------
def run_side(side: str, argv: list[str], device: str, verbose: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MATHCTL_NO_PROGRESS", "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # mathctl trains on CUDA whenever torch sees a GPU
    with tempfile.NamedTemporaryFile(prefix=f"bench-{side}-", suffix=".json", delete=False) as f:
        result_path = f.name
    try:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_side", side, "--_result", result_path]
        proc = subprocess.run(cmd, env=env, text=True, stdout=None if verbose else subprocess.PIPE,
                              stderr=None if verbose else subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "" if verbose else "\n".join((proc.stdout or "").splitlines()[-40:])
            sys.exit(f"the {side} run failed (exit {proc.returncode}):\n{tail}")
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._side:
        result = side_mathctl(args) if args._side == "mathctl" else side_trl(args, padding_free=args._side == "trl-pf")
        Path(args._result).write_text(json.dumps(result))
        return

    if args.only != "mathctl":
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL is not installed: run `pip install trl` (it is in the project's optional extra `bench`: "
                     "`pip install -e .[bench]`) to use this benchmark")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda asked, but torch sees no CUDA device")
    from mathctl import models

    model_dir = models.resolve_model_path(f"tiny:{args.preset}")  # build the tiny model once, outside the timing
    child_argv = [a for a in argv if a not in ("--json", "--verbose")]
    sides = [s for s in SIDES if args.only in (None, s) and not (args.trl_padding_free and s == "trl")]
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for _ in range(args.repeats):
        for side in sides:
            runs[side].append(run_side(side, child_argv, args.device, args.verbose))
    results = {side: max(rs, key=lambda r: r["tokens_per_s"]) for side, rs in runs.items()}

    report: dict[str, Any] = {
        "preset": args.preset, "model_dir": model_dir, "device": args.device, "precision": args.precision,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "micro_batch_size": args.micro_batch_size,
        "max_seq_len": args.max_seq_len, "repeats": args.repeats, "mathctl_overrides": args.overrides,
        "cpu_count": os.cpu_count(), "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    for side, r in results.items():
        report[f"{side}_tokens_per_s"] = r["tokens_per_s"]
        row = {k: r[k] for k in ("tokens_per_s", "median_step_tokens_per_s", "tokens", "seconds", "padded_tokens",
                                 "attn_implementation")}
        row["all_runs_tokens_per_s"] = [x["tokens_per_s"] for x in runs[side]]
        steps_s = sorted(r["timed_step_seconds"])
        row["median_step_s"] = steps_s[len(steps_s) // 2]
        if args.device == "cuda":
            row["mfu"] = 6 * r["params"] * r["tokens_per_s"] / (args.peak_tflops * 1e12)
        report[side] = row
        report["params"] = r["params"]
    if "mathctl" in results:
        report["mathctl"]["own_tokens_per_s"] = results["mathctl"].get("own_tokens_per_s")
    for trl_side in ("trl", "trl-pf"):
        if "mathctl" in results and trl_side in results:
            m, t = results["mathctl"], results[trl_side]
            key = "" if trl_side == "trl" else "_padding_free"
            report[f"ratio{key}"] = m["tokens_per_s"] / t["tokens_per_s"]
            report[f"median_step_ratio{key}"] = m["median_step_tokens_per_s"] / t["median_step_tokens_per_s"]
            if trl_side == "trl":
                report["same_step_tokens"] = m["step_tokens"] == t["step_tokens"]
            report["trl_version"] = t.get("trl_version")

    if args.json:
        print(json.dumps(report))
        return
    best = f", best of {args.repeats} runs per side" if args.repeats > 1 else ""
    print(f"SFT training throughput: tiny:{args.preset} ({report.get('params', 0):,} parameters), {args.device}, "
          f"{args.precision}, {args.steps} steps x {args.micro_batch_size} samples, max_seq_len {args.max_seq_len}, "
          f"first {args.warmup_steps} steps untimed{best}")
    if args.overrides:
        print(f"mathctl overrides: {' '.join(args.overrides)}")
    header = (f"{'':8} {'tokens/s':>9} {'med-step':>9} {'tokens':>8} {'seconds':>8} {'step s':>7} {'padded':>8}"
              f"  attention")
    if args.device == "cuda":
        header += "    MFU"
    print(header)
    for side in results:
        row = report[side]
        line = (f"{side:8} {row['tokens_per_s']:9.0f} {row['median_step_tokens_per_s']:9.0f} {row['tokens']:8d} "
                f"{row['seconds']:8.2f} {row['median_step_s']:7.3f} {row['padded_tokens']:8d}  {row['attn_implementation']}")
        if args.device == "cuda":
            line += f" {row['mfu']:6.1%}"
        print(line)
    if "ratio" in report:
        print(f"ratio mathctl / TRL default (padded): {report['ratio']:.2f}x (median-step figures: "
              f"{report['median_step_ratio']:.2f}x)"
              + ("" if report["same_step_tokens"] else "  (warning: the sides saw different token counts per step)"))
    if "ratio_padding_free" in report:
        print(f"ratio mathctl / TRL padding-free (packing bfd): {report['ratio_padding_free']:.2f}x (median-step "
              f"figures: {report['median_step_ratio_padding_free']:.2f}x; its steps hold other samples, tokens/s compares)")
    print(f"1-min load average before/after: {report['loadavg_1min'][0]} / {report['loadavg_1min'][1]} "
          f"on {report['cpu_count']} CPUs (other work on the machine skews CPU figures; use --repeats)")
    print("tokens/s = non-padding input tokens of the timed steps / their wall-clock seconds; med-step = median over "
          "steps of each step's tokens/s; step s = median step time; padded = tokens the model ran on, padding included")


if __name__ == "__main__":
    main()
