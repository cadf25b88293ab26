#!/usr/bin/env python3
"""One command that brings back every GPU figure mathctl needs, from one blind run on one GPU.

A GPU is lent rarely and for minutes, to a session that may not see the output until it ends. So this
runs seven sections in a fixed order, each in its own subprocess with a time limit: a crash, an
out-of-memory error or a hung NCCL call ends that section only; its error goes into the table and
the JSON file, and the next section starts. The JSON file is rewritten after every section (and a
section's rows as they come), so a run killed half-way still leaves what finished.

Sections (what is measured)
    env      GPU name, memory and compute capability; torch, CUDA, cuDNN, NCCL, transformers versions;
             which optional packages import (flash_attn, vllm, datasets, pydantic, ...); whether
             importing mathctl's cli/sft/grpo/convert/engines pulls in `datasets` or `matplotlib`.
    build    `tiny:qwen2.5-0.5b` (Qwen2.5-0.5B's shape, vocab 151936, random weights): the tiny
             tokenizer is trained and the model saved once, cached for the other sections.
    sft      Training tokens/s and MFU, bf16 autocast over fp32 weights (mathctl's train.precision=bf16),
             per attention: `sdpa` (as `mathctl sft` runs it with packing: sdpa per packed sample via
             mathctl_varlen) and `flash_attention_2` (skipped, with a note, when flash_attn does not
             import). Each step is mathctl sft's step body on mathctl's own pieces: sft.collate (one
             padding-free packed row), sft.token_nll_sum (its loss), training.adapt_model/autocast/
             build_optimizer/build_scheduler/clip_grad_norm. The micro-batches are random token ids of a
             fixed length, every token trained: sft.run itself is not used because its data loading
             gives short synthetic samples, not a controlled shape. tokens/s = input tokens of the
             timed steps / their wall seconds (after warmup steps, CUDA synchronised).
             MFU = 6 * params * tokens/s / peak bf16 FLOP/s (params: all, a tied embedding once; it
             is also the LM head); `mfu_attn` adds causal attention, 6 * layers * sample_len *
             heads * head_dim per token. Peak: a small table by GPU name (H100 SXM dense bf16 989
             TFLOP/s; an unknown name uses 989, with a note), or `--peak-tflops`.
    engine   mathctl.engines.hf.HFEngine (given model= and tokenizer=), bf16, greedy, EOS disabled so
             every row generates exactly --new-tokens tokens: generated tokens/s of one `generate`
             call at batch 1 (2 prompts), 16 and 64, after one short warmup call. Clock around the
             whole call (tokenisation, prefill, decoding, detokenisation).
    grpo     `mathctl grpo --recipe quickstart-grpo model.path=tiny:qwen2.5-0.5b ...` run in-process
             through `mathctl.cli.main` (hf engine, synthetic prompts: no `datasets`), 16 prompts x 8
             completions of up to --new-tokens tokens, 2 steps; per step generation_s, reward_s,
             train_s and weight_sync_s from metrics.jsonl (step 1 pays warm-up), and the command's
             wall time (model loading and the final checkpoint included).
    fsdp     FSDP2 over NCCL with one process (world 1; gloo on CPU): init_process_group, then
             mathctl.training.shard_model (fully_shard per decoder layer + root, bf16 params, fp32
             reduce), the same micro-batches as `sft` for a few steps, training.full_model_state_dict
             (the gather every save does). Tokens/s, peak memory, seconds of each stage.
    convert  A ~1.1B-parameter Llama-shaped random model (hidden 2048, 16 layers, vocab 32000, untied;
             fp32, 4.4 GB) saved with mathctl.training.save_checkpoint (DCP with model + AdamW state,
             as training writes it), then `mathctl convert-ckpt` (mathctl.convert.convert, --from fsdp)
             to a Hugging Face folder in a fresh CPU-only subprocess: seconds, GB/s, peak RSS and peak
             above the interpreter's baseline; the converted model's logits on a fixed input are
             compared with the original's (allclose, and the max difference).

Kept the same
    One model (tiny:PRESET) for build, sft, engine, grpo and fsdp; the same random micro-batches (seed 0)
    for sft and fsdp, so their tokens/s compare; bf16 compute everywhere on GPU (fp32 master weights in
    training, bf16 weights in the engine).

Sizes (`--smoke`: tiny:qwen2-tiny, a 64-wide Llama for convert, a few tokens, CPU, gloo) are estimated
at about 5 minutes for the whole GPU run on an H100 (not measured yet); `--budget-s` (default 450)
caps it: each section gets its own limit and no more than what is left of the total.

Run
    bench/gpu_check                               # GPU, all sections; the JSON goes to $OUT or the cwd
    bench/gpu_check --smoke                       # CPU, tiny shapes: every section end to end (75 s, 2 cores)
    bench/gpu_check --sections sft,engine --out /tmp/gpu.json
    bench/gpu_check --json                        # the JSON report on stdout instead of the table
    python bench/gpu_check.py ...                 # the same (bench/gpu_check is a wrapper)

The script puts the repository on sys.path itself (no install needed) and needs neither `datasets`,
`matplotlib` nor vllm (mathctl's cli imports datasets only to quiet its logging, when it is
installed). On a machine with torch, transformers, accelerate, peft, typer and rich but not
pydantic (the lent GPU box, which has no package index), carry these wheels, fetched here by
`bench/gpu_check_wheels.sh` into .whl/ (about 12 MB; pydantic-core has one wheel per Python version,
pip picks the matching one):
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 click==8.5.1
and install them before the run:
    python3 -m pip install -q --no-index --no-deps --no-compile --find-links .whl --target /tmp/site \\
        -r .whl/requirements.txt && export PYTHONPATH=/tmp/site
pyyaml, safetensors, tokenizers, huggingface-hub, numpy, jinja2 and sympy come with transformers and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("env", "build", "sft", "engine", "grpo", "fsdp", "convert")
# seconds each section may take on a GPU (a cap, not an estimate: an H100 needs about half)
GPU_BUDGETS_S = {"env": 60, "build": 150, "sft": 120, "engine": 120, "grpo": 180, "fsdp": 100, "convert": 200}
SMOKE_BUDGETS_S = {"env": 60, "build": 120, "sft": 90, "engine": 90, "grpo": 120, "fsdp": 90, "convert": 90}

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
]
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM

OPTIONAL_PACKAGES = ["transformers", "accelerate", "peft", "typer", "click", "rich", "pydantic", "pydantic_core",
                     "yaml", "safetensors", "tokenizers", "huggingface_hub", "numpy", "jinja2", "sympy", "psutil",
                     "triton", "flash_attn", "vllm", "datasets", "pyarrow", "matplotlib", "trl", "liger_kernel"]

# Llama-shaped configs for the convert section: ~1.1B parameters (4.4 GB fp32) and a tiny one.
CONVERT_SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False},
}


@dataclass
class Sizes:
    """Every size the sections use; GPU defaults or --smoke, a few overridable by flags."""

    device: str                  # cuda or cpu
    preset: str                  # tiny:PRESET for build/sft/engine/grpo/fsdp
    sft_samples: int             # samples per micro-batch (= per optimiser step)
    sft_seq_len: int             # tokens per sample
    sft_warmup: int              # untimed first steps
    sft_steps: int               # timed steps
    engine_batches: tuple[int, ...]
    new_tokens: int              # engine and GRPO completion length
    grpo_prompts: int
    grpo_group: int
    grpo_steps: int
    grpo_micro_batch: int
    fsdp_warmup: int
    fsdp_steps: int
    convert_shape: str
    convert_shard_size: str
    convert_optimizer: bool      # AdamW state in the checkpoint, as training writes it


def make_sizes(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        sizes = Sizes(device="cpu", preset="qwen2-tiny", sft_samples=4, sft_seq_len=64, sft_warmup=1, sft_steps=3,
                      engine_batches=(1, 16, 64), new_tokens=8, grpo_prompts=2, grpo_group=2, grpo_steps=2,
                      grpo_micro_batch=4, fsdp_warmup=1, fsdp_steps=2, convert_shape="tiny",
                      convert_shard_size="20KB", convert_optimizer=True)
    else:
        sizes = Sizes(device="cuda", preset="qwen2.5-0.5b", sft_samples=16, sft_seq_len=1024, sft_warmup=3,
                      sft_steps=20, engine_batches=(1, 16, 64), new_tokens=128, grpo_prompts=16, grpo_group=8,
                      grpo_steps=2, grpo_micro_batch=16, fsdp_warmup=2, fsdp_steps=8, convert_shape="1b",
                      convert_shard_size="2GB", convert_optimizer=True)
    if args.preset:
        sizes.preset = args.preset
    if args.sft_steps:
        sizes.sft_steps = args.sft_steps
    if args.new_tokens:
        sizes.new_tokens = args.new_tokens
    if args.convert_model_only:
        sizes.convert_optimizer = False
    return sizes


# --- options ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check", description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU with tiny shapes: proves every section runs end to end")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in this order (default all: {','.join(SECTIONS)})")
    p.add_argument("--out", default=None, help="JSON report path (default $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock cap for the whole run in seconds; sections not started in time are skipped (default 450)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default: by GPU name, 989 when unknown)")
    p.add_argument("--preset", default=None, help="tiny model preset (default qwen2.5-0.5b; --smoke: qwen2-tiny)")
    p.add_argument("--sft-steps", type=int, default=None, help="timed SFT steps (default 20; --smoke 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per completion, engine and GRPO (default 128)")
    p.add_argument("--convert-model-only", action="store_true",
                   help="convert: checkpoint without AdamW state (a third of the I/O)")
    p.add_argument("--workdir", default=None, help="where checkpoints and run folders go (default: a temporary folder)")
    p.add_argument("--keep-workdir", action="store_true", help="leave the work folder in place")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    # internal: one section in a subprocess
    p.add_argument("--_section", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--_src", help=argparse.SUPPRESS)
    p.add_argument("--_dst", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s and s not in SECTIONS]
    if unknown and not args._section:
        p.error(f"unknown section(s) {', '.join(unknown)}; available: {', '.join(SECTIONS)}")
    return args


# --- inside a section's subprocess --------------------------------------------------------------
class Recorder:
    """A section's rows and details, rewritten to its result file after every change."""

    def __init__(self, path: Path, section: str, deadline: float):
        self.path, self.section, self.deadline = path, section, deadline
        self.data: dict[str, Any] = {"rows": [], "details": {}}

    def left(self) -> float:
        """Seconds before the parent kills this section."""
        return self.deadline - time.time()

    def row(self, item: str, figures: dict[str, Any] | None = None, *, status: str = "ok", note: str | None = None,
            error: str | None = None) -> None:
        row = {"item": item, "status": status, "figures": figures or {}, "note": note, "error": error}
        self.data["rows"].append(row)
        self._flush()
        shown = ", ".join(f"{k}={format_value(k, v)}" for k, v in (figures or {}).items())
        tail = "; ".join(x for x in (note, error) if x)
        say(f"[{self.section}] {item}: {status}" + (f": {shown}" if shown else "") + (f" ({tail})" if tail else ""))

    def fail(self, item: str, exc: BaseException, figures: dict[str, Any] | None = None) -> None:
        """A failed measurement: its error in the row, the traceback in the details."""
        self.data["details"].setdefault("tracebacks", {})[item] = traceback.format_exc(limit=20)[-4000:]
        self.row(item, figures, status="failed", error=error_line(exc))

    def detail(self, **values: Any) -> None:
        self.data["details"].update(values)
        self._flush()

    def _flush(self) -> None:
        write_json(self.path, self.data)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def format_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if key.endswith("_pct"):
            return f"{value:.1f}%"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _device(sizes: Sizes):
    import torch

    if sizes.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch (use --smoke for the CPU check)")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)  # with an index: init_process_group(device_id=...) needs one
    return torch.device("cpu")


def peak_tflops(args: argparse.Namespace, gpu_name: str | None) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if gpu_name and key in gpu_name:
            return value, f"table entry '{key}'"
    return DEFAULT_PEAK_TFLOPS, f"'{gpu_name}' not in the table: H100 SXM's {DEFAULT_PEAK_TFLOPS:.0f} assumed"


def _heavy_modules() -> dict[str, bool]:
    """Whether what mathctl must not need here has been imported by this process so far."""
    return {name: name in sys.modules for name in ("datasets", "matplotlib", "vllm")}


# --- section: env -------------------------------------------------------------------------------
def _matmul_probe(torch) -> dict[str, Any]:
    """TFLOP/s of a bf16 8192^2 GEMM on the GPU (fp32 512^2 on CPU)."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 20 if cuda else 5
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - began
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "tflops": round(2 * n**3 * repeats / seconds / 1e12, 2)}


def section_env(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import importlib
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    gpu: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu.update(name=torch.cuda.get_device_name(0), memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported())
        try:
            nccl = torch.cuda.nccl.version()
            versions["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as exc:  # noqa: BLE001 - a missing NCCL is a fact to report
            versions["nccl"] = f"unavailable ({error_line(exc)})"
        peak, source = peak_tflops(args, gpu["name"])
        gpu.update(peak_bf16_tflops=peak, peak_source=source)
    rec.row("gpu", gpu, note=None if torch.cuda.is_available() else "no CUDA device (a --smoke run on CPU)")
    rec.row("versions", versions)

    rec.row("matmul", _matmul_probe(torch), note="one square GEMM, repeated: what the chip gives mathctl's MFU to aim at")

    distributions = importlib.metadata.packages_distributions()  # import name -> distribution names
    packages: dict[str, str] = {}
    for name in OPTIONAL_PACKAGES:
        if importlib.util.find_spec(name) is None:
            packages[name] = "missing"
            continue
        try:
            module = importlib.import_module(name)  # a real import: a flash_attn built for another torch fails here
            version = None
            for dist in distributions.get(name, []):
                try:
                    version = importlib.metadata.version(dist)
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
            packages[name] = str(version or getattr(module, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - broken installs are facts to report
            packages[name] = f"broken ({error_line(exc)})"
    rec.row("packages", packages)

    # The modules this check runs, imported in a process that has not imported datasets itself.
    fresh = subprocess.run([sys.executable, "-c", (
        "import sys, json; sys.path.insert(0, sys.argv[1]); ok = {}\n"
        "for m in ('mathctl.cli', 'mathctl.sft', 'mathctl.grpo', 'mathctl.training', 'mathctl.models', "
        "'mathctl.attention', 'mathctl.engines.hf', 'mathctl.convert', 'mathctl.core.rundir'):\n"
        "    try: __import__(m); ok[m] = 'ok'\n"
        "    except Exception as e: ok[m] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps({'imports': ok, 'pulled_in': {n: n in sys.modules for n in ('datasets', 'matplotlib', 'vllm', 'pyarrow')}}))"
    ), str(REPO)], capture_output=True, text=True, timeout=120)
    if fresh.returncode != 0:
        raise RuntimeError(f"importing mathctl failed: {fresh.stderr.strip().splitlines()[-1:]}")
    found = json.loads(fresh.stdout.strip().splitlines()[-1])
    broken = {m: e for m, e in found["imports"].items() if e != "ok"}
    pulled = [n for n, hit in found["pulled_in"].items() if hit]
    rec.row("mathctl imports", {"modules_ok": len(found["imports"]) - len(broken), "broken": broken or None,
                                "pulled_in": ",".join(pulled) or "none"},
            status="ok" if not broken and not pulled else "failed",
            note="mathctl cli/sft/grpo/training/models/attention/engines.hf/convert/rundir imported in a fresh process")
    rec.detail(versions=versions, gpu=gpu, packages=packages, mathctl_imports=found)


# --- section: build -----------------------------------------------------------------------------
def section_build(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mathctl import models

    target = models.cache_dir() / "tiny" / f"{sizes.preset}-seed0-v{models.TINY_VERSION}"
    cached = (target / "config.json").is_file()
    began = time.perf_counter()
    path = models.resolve_model_path(f"tiny:{sizes.preset}")
    seconds = time.perf_counter() - began
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    rec.row(f"tiny:{sizes.preset}", {"seconds": round(seconds, 2), "cached": cached, "params": params,
                                     "vocab": config.vocab_size, "layers": config.num_hidden_layers,
                                     "hidden": config.hidden_size, "weights_gb": round(size / 1e9, 2)},
            note=f"folder {path}")


# --- section: sft ---------------------------------------------------------------------------------
def _random_examples(vocab: int, samples: int, length: int, steps: int, seed: int = 0) -> list[list[dict]]:
    """Per step, `samples` examples of `length` random token ids, every token trained (labels = ids)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (samples, length), generator=gen).tolist()
        out.append([{"input_ids": row, "labels": row} for row in ids])
    return out


def _model_flops_per_token(config, params: int, sample_len: int) -> tuple[float, float]:
    """6N, and 6N plus causal attention (6 * layers * sample_len * heads * head_dim), per token."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 6.0 * config.num_hidden_layers * sample_len * heads * head_dim
    return 6.0 * params, 6.0 * params + attention


def _train_steps(rec: Recorder, model, optimizer, scheduler, train, dist, steps_examples: list[list[dict]], attn: str,
                 warmup: int, device, stop_margin_s: float) -> dict[str, Any]:
    """mathctl sft's step body over `steps_examples`; returns timings (warmup steps untimed)."""
    from mathctl import sft, training

    ends: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    grad_norm = 0.0
    world = max(dist.world, 1)
    _sync(device)
    start = time.perf_counter()
    for step, examples in enumerate(steps_examples):
        if step > warmup and rec.left() < stop_margin_s:
            break  # out of this section's time: report the steps done
        batch = sft.collate(examples, packing=True, pad_id=0, attn_implementation=attn,
                            row_capacity=len(examples[0]["input_ids"]))
        targets = sft.count_targets(examples)
        with training.autocast(train, dist, model):
            nll = sft.token_nll_sum(model, batch, device)
        (nll * world / targets).backward()  # token mean over the step, as sft.run
        loss = float(nll.detach()) / targets
        (loss_all,) = dist.all_reduce_sum([loss])  # a collective per step under FSDP, as sft.run
        grad_norm = training.clip_grad_norm(model, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        ends.append(time.perf_counter())
        tokens.append(sum(len(e["input_ids"]) for e in examples))
        losses.append(loss_all)
    timed = len(ends) - warmup
    if timed < 1:
        raise RuntimeError(f"only {len(ends)} steps ran before the time limit (warmup {warmup})")
    window = ends[-1] - (ends[warmup - 1] if warmup else start)
    step_s = sorted(b - a for a, b in zip(([start] + ends)[warmup:-1], ends[warmup:]))
    timed_tokens = sum(tokens[warmup:])
    return {"tokens_per_s": timed_tokens / window, "timed_steps": timed, "tokens_per_step": tokens[-1],
            "median_step_s": step_s[len(step_s) // 2], "loss_first": losses[0], "loss_last": losses[-1],
            "grad_norm": grad_norm, "finite": all(x == x and abs(x) != float("inf") for x in losses)}


def _sft_train_config(sizes: Sizes):
    from mathctl.sft import SFTTrain

    # constant lr, no warmup: the schedule does not change the cost of a step
    return SFTTrain(lr=1e-5, precision="bf16", micro_batch_size=sizes.sft_samples, max_seq_len=sizes.sft_seq_len,
                    lr_schedule="constant", warmup_steps=0, max_grad_norm=1.0, gradient_checkpointing=False)


def section_sft(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import torch

    from mathctl import attention, models, training
    from mathctl.core.config import LoraSpec, ModelSpec

    device = _device(sizes)
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    peak, peak_source = peak_tflops(args, gpu_name)
    rec.detail(peak_bf16_tflops=peak, peak_source=peak_source, gpu=gpu_name)
    for impl in ("sdpa", "flash_attention_2"):
        item = f"train {impl}"
        if impl == "flash_attention_2":
            if device.type != "cuda":
                rec.row(item, status="skipped", note="flash-attn needs CUDA")
                continue
            try:
                import flash_attn  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - ImportError, or a build for another torch
                rec.row(item, status="skipped", note=f"flash_attn does not import ({error_line(exc)})")
                continue
        if rec.left() < 20:
            rec.row(item, status="skipped", note="section time limit reached")
            continue
        samples = sizes.sft_samples
        while True:
            model = optimizer = scheduler = None
            try:
                train = _sft_train_config(sizes).model_copy(update={"micro_batch_size": samples})
                spec = ModelSpec(path=f"tiny:{sizes.preset}", attn_implementation=impl)
                model = models.load_causal_lm(spec, device_type=device.type)
                attn = impl
                if impl == "sdpa":  # what sft.run does with packing and no flash-attn
                    attn = attention.register()
                    model.set_attn_implementation(attn)
                model = training.adapt_model(model, train, LoraSpec(), device)
                model.train()
                optimizer = training.build_optimizer(model, train)
                total = sizes.sft_warmup + sizes.sft_steps
                scheduler = training.build_scheduler(optimizer, train, total)
                params = sum(p.numel() for p in model.parameters())
                data = _random_examples(model.config.vocab_size, samples, sizes.sft_seq_len, total)
                _reset_peak(device)
                out = _train_steps(rec, model, optimizer, scheduler, train, training.Dist(device=device), data, attn,
                                   sizes.sft_warmup, device, stop_margin_s=5)
                flops, flops_attn = _model_flops_per_token(model.config, params, sizes.sft_seq_len)
                figures = {"tokens_per_s": round(out["tokens_per_s"], 1)}
                if device.type == "cuda":
                    figures["mfu_pct"] = round(100 * flops * out["tokens_per_s"] / (peak * 1e12), 2)
                    figures["mfu_attn_pct"] = round(100 * flops_attn * out["tokens_per_s"] / (peak * 1e12), 2)
                figures.update({"median_step_s": round(out["median_step_s"], 4), "timed_steps": out["timed_steps"],
                                "tokens_per_step": out["tokens_per_step"], "peak_gib": _peak_gib(device),
                                "loss_first": round(out["loss_first"], 3), "loss_last": round(out["loss_last"], 3),
                                "attention": attn, "params": params})
                ok = out["finite"] and figures["timed_steps"] == sizes.sft_steps
                rec.row(item, figures, status="ok" if out["finite"] else "failed",
                        note=None if ok else ("non-finite loss" if not out["finite"] else "fewer steps: time limit"))
                break
            except Exception as exc:  # noqa: BLE001 - one attention's failure must not stop the other
                oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                if oom and samples > 1:
                    say(f"[sft] {impl}: out of memory at {samples} samples x {sizes.sft_seq_len}; retrying with {samples // 2}")
                    samples //= 2
                    continue
                rec.fail(item, exc)
                break
            finally:
                del model, optimizer, scheduler  # the scheduler holds the optimizer, which holds the weights
                _free(device)
    rec.detail(pulled_in=_heavy_modules(), precision="bf16 autocast over fp32 weights (train.precision=bf16)",
               layout=f"{sizes.sft_samples} samples x {sizes.sft_seq_len} random tokens per step, packed padding-free")


# --- section: engine ------------------------------------------------------------------------------
def section_engine(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import torch

    from mathctl import models
    from mathctl.benchmarks import DEFAULT_PROMPT, render_prompt
    from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
    from mathctl.engines.hf import HFEngine
    from mathctl.synthetic import SyntheticSpec, generate

    device = _device(sizes)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    spec = ModelSpec(path=f"tiny:{sizes.preset}", chat_template="chatml")
    tokenizer = models.load_tokenizer(spec)
    model = models.load_causal_lm(spec, dtype=getattr(torch, dtype_name), device_type=device.type).to(device).eval()
    most = max(sizes.engine_batches)
    prompts = [render_prompt(DEFAULT_PROMPT, row["problem"]) for row in generate(SyntheticSpec(num_problems=most, seed=5))]

    def engine(batch: int) -> HFEngine:
        eng = HFEngine(None, EngineConfig(batch_size=batch, device=device.type, dtype=dtype_name),
                       model=model, tokenizer=tokenizer)
        eng.eos_ids = set()  # fixed-length completions: a random model's early EOS would skew tokens/s
        return eng

    began = time.perf_counter()
    engine(most).generate(prompts, SamplingConfig(max_new_tokens=4))  # warmup: allocator, kernels
    rec.detail(warmup_s=round(time.perf_counter() - began, 2), dtype=dtype_name, prompts_available=len(prompts))
    sampling = SamplingConfig(max_new_tokens=sizes.new_tokens)  # temperature 0: greedy
    last_s = 0.0
    for batch in sizes.engine_batches:
        item = f"generate batch {batch}"
        count = max(batch, 2)  # batch 1: two prompts one after the other
        if rec.left() < max(10.0, 1.5 * last_s):
            rec.row(item, status="skipped", note="section time limit reached")
            continue
        try:
            eng = engine(batch)
            _reset_peak(device)
            _sync(device)
            began = time.perf_counter()
            out = eng.generate(prompts[:count], sampling)
            _sync(device)
            last_s = time.perf_counter() - began
            tokens = sum(s.num_tokens for group in out for s in group)
            calls = -(-count // batch)
            rec.row(item, {"tokens_per_s": round(tokens / last_s, 1), "seconds": round(last_s, 3), "prompts": count,
                           "tokens": tokens, "ms_per_decode_step": round(1000 * last_s / (calls * sizes.new_tokens), 2),
                           "peak_gib": _peak_gib(device)},
                    status="ok" if tokens == count * sizes.new_tokens else "failed",
                    note=None if tokens == count * sizes.new_tokens else f"expected {count * sizes.new_tokens} tokens")
        except Exception as exc:  # noqa: BLE001 - the next batch size may still work
            rec.fail(item, exc)
            _free(device)
    rec.detail(pulled_in=_heavy_modules())


# --- section: grpo --------------------------------------------------------------------------------
def section_grpo(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import shutil

    from mathctl import cli

    run = Path(args.workdir) / "grpo-run"
    shutil.rmtree(run, ignore_errors=True)
    argv = ["grpo", "--recipe", "quickstart-grpo", f"model.path=tiny:{sizes.preset}",
            f"grpo.prompts_per_step={sizes.grpo_prompts}", f"grpo.group_size={sizes.grpo_group}",
            f"grpo.max_completion_len={sizes.new_tokens}", f"train.max_steps={sizes.grpo_steps}",
            f"train.micro_batch_size={sizes.grpo_micro_batch}", "train.precision=bf16", "train.log_every_steps=1",
            "engine.backend=hf", f"engine.device={sizes.device}",
            f"data.synthetic.num_problems={max(80, sizes.grpo_prompts * sizes.grpo_steps)}",
            "output.save_every_steps=null", "output.plots=false", "output.save_hf_checkpoints=false",
            "--run-dir", str(run)]
    rec.detail(command="mathctl " + " ".join(argv))
    began = time.perf_counter()
    code = cli.main(argv)
    wall = time.perf_counter() - began
    if code != 0:
        raise RuntimeError(f"mathctl grpo exited with code {code} (its error is in the output above)")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    completions = sizes.grpo_prompts * sizes.grpo_group
    keys = ("generation_s", "reward_s", "train_s", "weight_sync_s")
    for r in records:
        figures = {k: round(r[k], 3) for k in keys}
        figures["step_s"] = round(sum(r[k] for k in keys), 3)
        figures["completion_len"] = round(r["completion_len"], 1)
        figures["gen_tokens_per_s"] = round(completions * r["completion_len"] / r["generation_s"], 1)
        figures["reward"] = round(r["reward"], 3)
        rec.row(f"step {r['step']}", figures, note="warm-up step" if r["step"] == 1 and len(records) > 1 else None)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    rec.row("command", {"wall_s": round(wall, 2), "steps": len(records), "completions_per_step": completions,
                        "status": summary.get("status"), "matplotlib_imported": "matplotlib" in sys.modules},
            note="wall includes model loading, engine start and the final checkpoint + final/ save")
    # datasets shows up here only where it is installed: cli._quiet_libraries imports it in a try/except
    rec.detail(summary=summary, pulled_in=_heavy_modules())
    shutil.rmtree(run, ignore_errors=True)


# --- section: fsdp --------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_fsdp(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import torch
    import torch.distributed as tdist

    from mathctl import attention, models, training
    from mathctl.core.config import LaunchConfig, LoraSpec, ModelSpec

    device = _device(sizes)
    backend = "nccl" if device.type == "cuda" else "gloo"

    class OneRankSharded(training.Dist):
        """World 1 that still takes the multi-process path: fully_shard, collectives, gathers."""

        @property
        def distributed(self) -> bool:
            return True

    began = time.perf_counter()
    tdist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                             device_id=device if device.type == "cuda" else None)
    try:
        probe = torch.ones(1024, device=device)
        tdist.all_reduce(probe)
        _sync(device)
        init_s = time.perf_counter() - began
        rec.row("process group", {"backend": tdist.get_backend(), "world": tdist.get_world_size(),
                                  "init_and_all_reduce_s": round(init_s, 3), "all_reduce_ok": bool(probe[0].item() == 1.0)})
        dist = OneRankSharded(rank=0, world=1, local_rank=0, device=device)
        train = _sft_train_config(sizes)
        spec = ModelSpec(path=f"tiny:{sizes.preset}")
        attn = models.pick_attn_implementation(spec.attn_implementation, device.type)
        began = time.perf_counter()
        model = models.load_causal_lm(spec, device_type=device.type)
        if attn == "sdpa":
            attn = attention.register()
            model.set_attn_implementation(attn)
        model = training.adapt_model(model, train, LoraSpec(), device)
        model = training.shard_model(model, LaunchConfig(num_processes=1, preset="fsdp"), train, dist)
        model.train()
        shard_s = time.perf_counter() - began
        sharded = type(model).__name__.startswith("FSDP")
        optimizer = training.build_optimizer(model, train)
        total = sizes.fsdp_warmup + sizes.fsdp_steps
        scheduler = training.build_scheduler(optimizer, train, total)
        data = _random_examples(model.config.vocab_size, sizes.sft_samples, sizes.sft_seq_len, total)
        _reset_peak(device)
        try:
            out = _train_steps(rec, model, optimizer, scheduler, train, dist, data, attn, sizes.fsdp_warmup, device,
                               stop_margin_s=15)
        except torch.cuda.OutOfMemoryError:
            # as sft: half the micro-batch rather than no figure
            say("[fsdp] out of memory; retrying with half the samples per step")
            _free(device)
            data = [step[: max(1, len(step) // 2)] for step in data]
            out = _train_steps(rec, model, optimizer, scheduler, train, dist, data, attn, sizes.fsdp_warmup, device,
                               stop_margin_s=15)
        rec.row("fully_shard train", {"tokens_per_s": round(out["tokens_per_s"], 1), "timed_steps": out["timed_steps"],
                                      "tokens_per_step": out["tokens_per_step"],
                                      "median_step_s": round(out["median_step_s"], 4), "peak_gib": _peak_gib(device),
                                      "load_and_shard_s": round(shard_s, 2), "sharded": sharded,
                                      "loss_last": round(out["loss_last"], 3), "grad_norm": round(out["grad_norm"], 3),
                                      "attention": attn},
                status="ok" if sharded and out["finite"] else "failed",
                note="bf16 params / fp32 reduce (MixedPrecisionPolicy); compare tokens/s with sft's sdpa row")
        began = time.perf_counter()
        state = training.full_model_state_dict(model)
        gather_s = time.perf_counter() - began
        values = sum(t.numel() for t in state.values())  # a tied embedding counts under both names
        on_cpu = all(t.device.type == "cpu" for t in state.values())
        rec.row("full state dict gather", {"seconds": round(gather_s, 3), "tensors": len(state), "numel": values,
                                           "on_cpu": on_cpu}, status="ok" if on_cpu else "failed")
        del state, model, optimizer
    finally:
        tdist.destroy_process_group()
        _free(device)


# --- section: convert -----------------------------------------------------------------------------
def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def section_convert(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mathctl import training
    from mathctl.core.rundir import RunDir

    device = _device(sizes)
    work = Path(args.workdir) / "convert"
    shutil.rmtree(work, ignore_errors=True)
    config_dir, run_path, out_dir = work / "config", work / "run", work / "hf"
    config = LlamaConfig(**CONVERT_SHAPES[sizes.convert_shape], max_position_embeddings=2048)
    config.save_pretrained(config_dir)

    # 1. a random model, and the checkpoint training would write of it
    began = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it lives: 1.1B on CPU would take a minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    init_s = time.perf_counter() - began
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float().cpu()  # [2, 64, V]
    train = _sft_train_config(sizes)
    if sizes.convert_optimizer:
        optimizer = training.build_optimizer(model, train)
    else:  # plain SGD keeps no per-parameter state: a model-only checkpoint in the same layout
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = training.build_scheduler(optimizer, train, 1)
    recipe = f"step: sft\nmodel:\n  path: {config_dir}\n"
    run = RunDir.create(run_path, recipe_yaml=recipe, step="sft", resume=False, seeds={})
    began = time.perf_counter()
    step_dir = training.save_checkpoint(run, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                       trainer_state={}, dist=training.Dist(device=device), keep_last=None, hf=False)
    save_s = time.perf_counter() - began
    on_disk = sum(f.stat().st_size for f in (step_dir / "dcp").glob("*") if f.is_file())
    rec.row("checkpoint write", {"params": params, "model_gb": round(params * 4 / 1e9, 2),
                                 "dcp_gb": round(on_disk / 1e9, 2), "init_s": round(init_s, 2),
                                 "save_s": round(save_s, 2), "gb_per_s": round(on_disk / 1e9 / save_s, 2),
                                 "optimizer_state": sizes.convert_optimizer},
            note=f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
                 "training.save_checkpoint (DCP: model + optimizer groups)")
    del model, optimizer, scheduler
    _free(device)

    # 2. mathctl convert-ckpt in a fresh CPU-only process, so its peak RSS is the conversion's own
    result = work / "convert-result.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_section", "convert-worker", "--_result", str(result),
           "--_deadline", str(rec.deadline), "--_src", str(step_dir), "--_dst", str(out_dir),
           "--workdir", args.workdir] + (["--smoke"] if args.smoke else [])
    proc = subprocess.run(cmd, env=env, timeout=max(10.0, rec.left() - 5))
    data = json.loads(result.read_text()) if result.is_file() else {}
    if proc.returncode != 0 or "summary" not in data:
        raise RuntimeError(f"the conversion process failed (exit {proc.returncode}): {data.get('error', 'see output above')}")
    s = data["summary"]
    rec.row("convert-ckpt dcp->hf", {"seconds": s["seconds"], "gb_per_s": s["gb_per_s"],
                                     "written_gb": round(s["written_bytes"] / 1e9, 2), "files": len(s["files"]),
                                     "peak_rss_gb": round(data["peak_rss"] / 1e9, 2),
                                     "above_baseline_gb": round((data["peak_rss"] - data["baseline_rss"]) / 1e9, 2),
                                     "shard_size": sizes.convert_shard_size},
            note=f"from {s['from']}; " + "; ".join(s.get("notes", [])))

    # 3. the converted folder gives the same logits
    began = time.perf_counter()
    converted = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = converted(input_ids=ids).logits.float().cpu()
    diff = (logits - reference).abs().max().item()
    same = torch.allclose(logits, reference, rtol=1e-5, atol=1e-5)
    rec.row("logits check", {"allclose": same, "equal": bool(torch.equal(logits, reference)), "max_abs_diff": diff,
                             "load_s": round(time.perf_counter() - began, 2)},
            status="ok" if same else "failed", note="fixed input [2, 64]; rtol=atol=1e-5, fp32")
    del converted
    _free(device)
    shutil.rmtree(work, ignore_errors=True)


def convert_worker(rec: Recorder, args: argparse.Namespace, sizes: Sizes) -> None:
    """The conversion alone (subprocess of `convert`): mathctl.convert.convert and this process's peak RSS."""
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline, as bench/convert.py

    from mathctl.convert import convert

    baseline = _vm_kib("VmRSS") * 1024
    summary = convert(Path(args._src), Path(args._dst), fmt_from="fsdp", shard_size=sizes.convert_shard_size,
                      progress_bar=False)
    rec.data.update(summary=summary, baseline_rss=baseline, peak_rss=_vm_kib("VmHWM") * 1024)
    rec.detail()


SECTION_FUNCTIONS = {"env": section_env, "build": section_build, "sft": section_sft, "engine": section_engine,
                     "grpo": section_grpo, "fsdp": section_fsdp, "convert": section_convert,
                     "convert-worker": convert_worker}


def child_main(args: argparse.Namespace) -> int:
    rec = Recorder(Path(args._result), args._section, args._deadline or time.time() + 600)
    rec.detail()
    try:
        SECTION_FUNCTIONS[args._section](rec, args, make_sizes(args))
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent, then a non-zero exit
        rec.data["error"] = error_line(exc)
        rec.data["traceback"] = traceback.format_exc(limit=30)[-6000:]
        rec.detail()
        traceback.print_exc()
        return 1
    return 0


# --- the parent: runs the sections, writes the report ---------------------------------------------
def _default_out() -> Path:
    folder = os.environ.get("OUT")
    return Path(folder) / "gpu_check.json" if folder else Path.cwd() / "gpu_check.json"


def _child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MATHCTL_NO_PROGRESS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "MATHCTL_CACHE_DIR" not in env:  # the tiny models are cached here; fall back to the work folder
        home = Path.home() / ".cache" / "mathctl"
        try:
            home.mkdir(parents=True, exist_ok=True)
            (home / ".gpu_check-probe").write_text("ok")
            (home / ".gpu_check-probe").unlink()
        except OSError:
            env["MATHCTL_CACHE_DIR"] = str(workdir / "cache")
    return env


def run_section(name: str, argv: list[str], workdir: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """One section in a subprocess (own session, so a timeout kills its children too)."""
    result = workdir / f"{name}.result.json"
    result.unlink(missing_ok=True)
    deadline = time.time() + timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--workdir", str(workdir),
           "--_section", name, "--_result", str(result), "--_deadline", str(deadline)]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr.fileno(), start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout)  # sections end their loops a margin before this; a hang is killed here
    except subprocess.TimeoutExpired:
        timed_out = True
    except KeyboardInterrupt:
        _kill(proc)
        raise
    if timed_out:
        _kill(proc)
    seconds = time.perf_counter() - began
    data: dict[str, Any] = {}
    if result.is_file():
        try:
            data = json.loads(result.read_text())
        except json.JSONDecodeError:
            data = {}
    rows = data.get("rows", [])
    if timed_out:
        status, error = "timeout", f"killed after {seconds:.0f} s (section limit {timeout:.0f} s)"
    elif proc.returncode != 0:
        status = "failed"
        error = data.get("error") or f"exit code {proc.returncode} with no result (see the output above)"
    else:
        status = "ok" if all(r["status"] in ("ok", "skipped") for r in rows) else "partial"
        error = None
    return {"status": status, "seconds": round(seconds, 1), "limit_s": round(timeout), "error": error,
            "rows": rows, "details": data.get("details", {}), "traceback": data.get("traceback")}


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def render(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1, default=str), flush=True)
        return
    env_rows = {r["item"]: r["figures"] for r in report["sections"].get("env", {}).get("rows", [])}
    gpu, versions = env_rows.get("gpu", {}), env_rows.get("versions", {})
    title = (f"gpu_check{' --smoke' if report['smoke'] else ''}: {gpu.get('name') or 'no GPU'}"
             f"{' ' + str(gpu.get('memory_gib')) + ' GiB' if gpu.get('memory_gib') else ''}; "
             f"torch {versions.get('torch', '?')} CUDA {versions.get('cuda')}; "
             f"{report['total_s']:.0f} s of {report['budget_s']:.0f} s")
    lines = []
    for name, sec in report["sections"].items():
        problem = sec["status"] not in ("ok", "partial") or sec.get("error")
        rows = sec["rows"] or [{"item": "(section)", "figures": {}, "status": sec["status"], "note": None,
                                "error": sec.get("error")}]
        for i, r in enumerate(rows):
            figures = ", ".join(f"{k}={format_value(k, v)}" for k, v in r["figures"].items())
            status = r["status"] + (f": {r['error']}" if r.get("error") else "") + (f" ({r['note']})" if r.get("note") else "")
            lines.append((name if i == 0 else "", r["item"], figures, status,
                          f"{sec['seconds']:.0f}" if i == 0 else ""))
        if problem and sec["rows"]:  # rows came back, then the section died: say how
            lines.append(("", "(section)", "", f"{sec['status']}: {sec.get('error') or ''}", ""))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain lines are enough for a log
        print(title)
        for line in lines:
            print(" | ".join(line))
        return
    table = Table(title=title, show_lines=False)
    for column, kwargs in (("section", {"style": "bold"}), ("item", {}), ("figures", {"overflow": "fold"}),
                           ("status / note", {"overflow": "fold"}), ("s", {"justify": "right"})):
        table.add_column(column, **kwargs)
    for line in lines:
        style = "red" if line[3].startswith(("failed", "timeout")) else None
        table.add_row(*line, style=style)
    width = max(160, Console().width) if sys.stdout.isatty() else 200
    Console(width=width).print(table)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._section:
        return child_main(args)

    began = time.perf_counter()
    out = Path(args.out) if args.out else _default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = _child_env(workdir)
    budgets = SMOKE_BUDGETS_S if args.smoke else GPU_BUDGETS_S
    wanted = [s for s in SECTIONS if s in args.sections.split(",")]
    # the children get the size options, not the parent's report options
    passed = [a for a in argv if a not in ("--json", "--keep-workdir")]
    for flag in ("--out", "--workdir", "--sections", "--budget-s"):
        if flag in passed:
            i = passed.index(flag)
            del passed[i:i + 2]
    passed = [a for a in passed if not a.startswith(("--out=", "--workdir=", "--sections=", "--budget-s="))]
    report: dict[str, Any] = {"tool": "bench/gpu_check", "smoke": args.smoke, "argv": argv, "budget_s": args.budget_s,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename,
                              "sizes": asdict(make_sizes(args)), "workdir": str(workdir), "total_s": 0.0,
                              "sections": {}}

    def stamp() -> str:
        return f"[gpu_check {time.perf_counter() - began:6.1f}s]"

    say(f"{stamp()} sections {', '.join(wanted)}; report {out}; work folder {workdir}")
    write_json(out, report)
    try:
        for name in wanted:
            left = args.budget_s - (time.perf_counter() - began)
            limit = min(budgets[name], left)
            if limit < (5 if args.smoke else 20):
                report["sections"][name] = {"status": "skipped", "seconds": 0.0, "limit_s": 0, "rows": [],
                                            "details": {}, "error": "the total --budget-s was spent"}
                say(f"{stamp()} {name}: skipped (total budget spent)")
                continue
            say(f"{stamp()} {name}: start (limit {limit:.0f} s)")
            section = run_section(name, passed, workdir, limit, env)
            report["sections"][name] = section
            report["total_s"] = round(time.perf_counter() - began, 1)
            write_json(out, report)
            say(f"{stamp()} {name}: {section['status']} in {section['seconds']:.1f} s"
                + (f": {section['error']}" if section["error"] else ""))
    except KeyboardInterrupt:
        say(f"{stamp()} interrupted")
    finally:
        report["total_s"] = round(time.perf_counter() - began, 1)
        write_json(out, report)
        if not args.keep_workdir and not args.workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    render(report, args.json)
    say(f"{stamp()} report written to {out}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
