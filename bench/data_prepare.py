"""SFT data preparation speed of `mathctl data prepare` against TRL's `SFTTrainer` dataset preparation.

What is measured
    Tokens per second of turning a JSONL file of GSM8K rows (question, answer "... #### 72") into
    a tokenized, loss-masked SFT dataset saved on disk: the output tokens (sum of `input_ids`
    lengths) divided by the wall-clock seconds from reading the JSONL to the end of
    `save_to_disk`. Python start-up, imports and the first tokenizer load are outside the clock. The mathctl side
    runs the `mathctl data prepare` command in-process (`cli.main`), environment set-up included.

What is kept the same
    The rows (`--rows` GSM8K-style rows: the real GSM8K train file from ../shared/data cycled, each
    repeat numbered so no two rows are the same; the built-in synthetic word problems in GSM8K's
    schema where that file is absent), the conversion (calculator annotations removed, "#### X"
    -> "The final answer is \\boxed{X}.", the same user prompt; TRL gets it as the user-side map a
    TRL user writes, mathctl applies its `gsm8k` source), the tokenizer and chat template (the tiny
    model's BPE tokenizer with chatml), the trained tokens (assistant turn only: mathctl
    `loss_on=assistant`; TRL prompt/completion conversational data, `completion_only_loss`), the
    maximum length (no row is cut at the default 4096), `num_proc`, and with `--pack N` packing
    to N tokens (mathctl best-fit decreasing; TRL `packing_strategy="bfd"`). The output token
    counts of both sides are printed; they agree when both render the same text.
    Each side runs in its own fresh subprocess with an empty `datasets` cache folder (so no side
    finds the other's or its own earlier `map` results), one after the other, `--repeats` times.

    TRL's preparation is `SFTTrainer._prepare_dataset`, the method its constructor calls on the
    train dataset; it is called directly on a trainer built over a one-row dataset so model set-up
    stays outside the clock. TRL's final shuffle is switched off (`shuffle_dataset=False`, its
    default) and the result saved with `save_to_disk` like mathctl's.

Run
    python bench/data_prepare.py                  # 20k rows, num_proc 1
    python bench/data_prepare.py --num-proc 2     # both sides with 2 worker processes
    python bench/data_prepare.py --pack 2048      # both sides also pack
    python bench/data_prepare.py --json           # one JSON line

Needs TRL (`pip install trl`, in the project's optional extra `bench`).
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

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "train" / "gsm8k" / "train.jsonl"
PROMPT = "Solve the following math problem. Put the final answer in \\boxed{{}}.\n\n{problem}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="GSM8K-style rows (default 20000)")
    p.add_argument("--preset", default="qwen2-small", help="tiny model whose tokenizer is used (default qwen2-small)")
    p.add_argument("--num-proc", type=int, default=None, help="map worker processes on both sides (default: none)")
    p.add_argument("--pack", type=int, default=None, metavar="SEQ_LEN", help="also pack to SEQ_LEN tokens on both sides")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; best kept (default 2)")
    p.add_argument("--only", choices=["mathctl", "trl"], default=None, help="run one side only")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--_side", choices=["mathctl", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--_input", help=argparse.SUPPRESS)
    p.add_argument("--_tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        p.error("--rows and --repeats must be at least 1")
    return args


def write_rows(path: Path, rows: int) -> str:
    """`rows` GSM8K-schema rows; returns where they came from."""
    if GSM8K.is_file():
        source = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
        origin = f"{GSM8K} ({len(source)} rows, cycled)"
    else:
        from mathctl.synthetic import SyntheticSpec, generate

        origin = "mathctl synthetic problems (../shared/data/train/gsm8k absent)"
        spec = SyntheticSpec(num_problems=rows, ops="+-*", max_ops=3)
        source = [{"question": p["problem"], "answer": f"{p['solution'].rsplit(chr(10), 1)[0]}\n#### {p['answer']}"}
                  for p in generate(spec)]
    with path.open("w") as f:
        for i in range(rows):
            row = source[i % len(source)]
            lap = i // len(source)
            question = row["question"] if lap == 0 else f"{row['question']} (variant {lap})"
            f.write(json.dumps({"question": question, "answer": row["answer"]}) + "\n")
    return origin


# --- the two sides (each in its own subprocess) ------------------------------------------------
def side_mathctl(args: argparse.Namespace) -> dict[str, Any]:
    """The `mathctl data prepare` command itself (its environment set-up included), in this process."""
    import contextlib
    import io

    from mathctl import cli
    from mathctl.core.config import ModelSpec
    from mathctl.models import load_tokenizer

    load_tokenizer(ModelSpec(path=args._tokenizer, chat_template="chatml"))  # imports and first load off the clock
    recipe = Path(args._out).parent / "data-recipe.yaml"  # a recipe file keeps the prompt's newlines exact
    recipe.write_text(f"source: gsm8k\nchat_template: chatml\nloss_on: assistant\n"
                      f"prompt_template: {json.dumps(PROMPT.replace('{{}}', '{}'))}\n")
    argv = ["data", "prepare", "--recipe", str(recipe), "--input", args._input, "--out", args._out,
            "--tokenizer", args._tokenizer, "--json"]
    if args.num_proc:
        argv += ["--num-proc", str(args.num_proc)]
    if args.pack:
        argv += ["pack=true", f"seq_len={args.pack}", f"max_seq_len={min(4096, args.pack)}"]
    captured = io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        code = cli.main(argv)
    seconds = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"mathctl data prepare exited {code}")
    stats = json.loads(captured.getvalue().strip().splitlines()[-1])
    return {"tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"], "rows": stats["rows_out"],
            "seconds": seconds, "out_rows": stats.get("packed_rows", stats["rows_out"])}


def side_trl(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import trl
    from trl import SFTConfig, SFTTrainer

    from mathctl.core.config import ModelSpec
    from mathctl.data import gsm8k_solution
    from mathctl.models import load_causal_lm, load_tokenizer

    spec = ModelSpec(path=args._tokenizer, chat_template="chatml")
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec)
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_length=args.pack or 4096,
                       packing=args.pack is not None, packing_strategy="bfd", dataset_num_proc=args.num_proc,
                       completion_only_loss=True, report_to="none", use_cpu=True, save_strategy="no")
    one = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1?"}],
                                       "completion": [{"role": "assistant", "content": "2"}]}])
    trainer = SFTTrainer(model=model, args=config, train_dataset=one, processing_class=tokenizer)

    def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
        solution, _ = gsm8k_solution(row["answer"])
        return {"prompt": [{"role": "user", "content": PROMPT.format(problem=row["question"])}],
                "completion": [{"role": "assistant", "content": solution}]}

    began = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=args._input, split="train")
    ds = raw.map(to_prompt_completion, remove_columns=raw.column_names, num_proc=args.num_proc)
    ds = trainer._prepare_dataset(ds, tokenizer, config, config.packing, None, "train")
    ds.save_to_disk(args._out)
    seconds = time.perf_counter() - began
    lengths = [len(ids) for ids in ds["input_ids"]]
    trained = sum(sum(label != -100 for label in labels) for labels in ds["labels"])
    rows = sum(len(s) for s in ds["seq_lengths"]) if "seq_lengths" in ds.column_names else len(ds)
    return {"tokens": sum(lengths), "trained_tokens": trained, "rows": rows, "seconds": seconds,
            "out_rows": len(ds), "trl_version": trl.__version__}


# --- driver ------------------------------------------------------------------------------------
def run_side(side: str, argv: list[str], input_path: Path, tokenizer: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-data-{side}-") as tmp:
        env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / "cache"), HF_HUB_OFFLINE="1",
                   MATHCTL_NO_PROGRESS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", CUDA_VISIBLE_DEVICES="")
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_side", side, "--_input", str(input_path),
               "--_tokenizer", tokenizer, "--_out", str(Path(tmp) / "out")]
        proc = subprocess.run([*cmd, "--_result", str(result)], env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            sys.exit(f"the {side} run failed (exit {proc.returncode}):\n" + "\n".join(
                (proc.stdout + proc.stderr).splitlines()[-30:]))
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._side:
        result = side_mathctl(args) if args._side == "mathctl" else side_trl(args)
        Path(args._result).write_text(json.dumps(result))
        return
    if args.only != "mathctl":
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL is not installed: `pip install trl` (or `pip install -e .[bench]`) to run this benchmark")
    from mathctl import models

    tokenizer = models.resolve_model_path(f"tiny:{args.preset}")
    child_argv = [a for a in argv if a != "--json"]
    sides = [s for s in ("mathctl", "trl") if args.only in (None, s)]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        input_path = Path(tmp) / "gsm8k-style.jsonl"
        origin = write_rows(input_path, args.rows)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for _ in range(args.repeats):
            for side in sides:
                runs[side].append(run_side(side, child_argv, input_path, tokenizer))
    report: dict[str, Any] = {"rows": args.rows, "input": origin, "num_proc": args.num_proc, "pack": args.pack,
                              "repeats": args.repeats, "cpu_count": os.cpu_count()}
    for side, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        report[side] = {**best, "tokens_per_s": best["tokens"] / best["seconds"],
                        "all_seconds": [round(r["seconds"], 2) for r in rs]}
    if len(runs) == 2:
        report["ratio"] = report["mathctl"]["tokens_per_s"] / report["trl"]["tokens_per_s"]
    if args.json:
        print(json.dumps(report))
        return
    print(f"SFT data preparation: {args.rows} GSM8K-style rows from {origin}; tokenizer tiny:{args.preset} (chatml); "
          f"num_proc {args.num_proc or 1}; packing {args.pack or 'off'}; best of {args.repeats} runs per side")
    print(f"{'':8} {'tokens/s':>10} {'seconds':>8} {'tokens':>9} {'trained':>9} {'samples':>8} {'out rows':>8}  runs (s)")
    for side in runs:
        r = report[side]
        print(f"{side:8} {r['tokens_per_s']:10.0f} {r['seconds']:8.2f} {r['tokens']:9d} {r['trained_tokens']:9d} "
              f"{r['rows']:8d} {r['out_rows']:8d}  {r['all_seconds']}")
    if "ratio" in report:
        print(f"ratio mathctl / TRL: {report['ratio']:.2f}x (TRL {report['trl'].get('trl_version')})")


if __name__ == "__main__":
    main()
