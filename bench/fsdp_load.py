"""Peak host memory of each rank while 2 FSDP2 processes (gloo, CPU) load a model of about 1 GB in fp32: the full
load every rank did before (`from_pretrained`, then `fully_shard`) against `training.prepare_model`'s sharded load
(meta-device build, `fully_shard`, each rank reading only its rows from the safetensors file).

The model is random: Qwen2 with hidden 1024, 20 layers, vocabulary 32,000, tied embeddings (259M parameters,
1.04 GB fp32), saved as safetensors in a temporary folder. Each rank reports its peak resident memory (VmHWM) and its
resident memory before the load (the baseline: torch, transformers, accelerate, peft and mathctl imported, the
process group joined, and a 1-layer Qwen2 built once so that transformers' lazily imported modeling code is in too;
what any process pays whatever the model's size); the load's own peak is the difference, shown as a multiple of the
model's fp32 size. Goal (issue 19): the sharded load's peak <= 0.6x the model on every rank.

    python bench/fsdp_load.py            # about 2 minutes on 2 cores, 6 GB of RAM free
    python bench/fsdp_load.py --json
    python bench/fsdp_load.py --layers 40 --max-shard-size 500MB   # a bigger model, an indexed checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build(folder: Path, layers: int, max_shard_size: str | None) -> int:
    """Write the random model; returns its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return sum(p.numel() for p in model.parameters())


def rank_main(mode: str, folder: str, out: str) -> None:
    """One rank: join the group, note the baseline, load as `mode` says, report the peak."""
    import accelerate  # noqa: F401  (the imports and lazy module loads count in the baseline)
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoModelForCausalLM, Qwen2Config

    from mathctl import models, training
    from mathctl.core.config import LaunchConfig, LoraSpec, ModelSpec, TrainBase

    torch.set_num_threads(1)
    launch = LaunchConfig(num_processes=2)
    dist = training.init_distributed(launch)
    # a 1-layer model of the same architecture: transformers loads its modeling code lazily, on first use
    warm = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    del warm
    spec, train, lora = ModelSpec(path=folder), TrainBase(), LoraSpec()
    dist.barrier()
    baseline_kb = status_kb("VmRSS")
    hwm_before_kb = status_kb("VmHWM")

    def build_model(empty: bool):
        return models.load_causal_lm(spec, empty=empty)

    if mode == "sharded":
        model = training.prepare_model(build_model, spec, train, lora, launch, dist)
        assert type(model).__name__.startswith("FSDP")
    else:  # before: every rank loads the whole model, then shards it
        model = training.shard_model(training.adapt_model(build_model(False), train, lora, dist.device), launch, train, dist)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    report = {"rank": dist.rank, "baseline_kb": baseline_kb, "hwm_before_load_kb": hwm_before_kb,
              "peak_kb": status_kb("VmHWM"), "after_kb": status_kb("VmRSS"), "local_shard_bytes": local}
    Path(out).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps(report))
    training.close_distributed(dist)


def run_mode(mode: str, folder: Path, work: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", MATHCTL_NO_PROGRESS="1", TRANSFORMERS_VERBOSITY="error")
    out = work / mode
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-main", mode, str(folder), str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"{mode} load failed:\n" + "\n".join(logs)[-4000:])
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--max-shard-size", default=None, help="split the checkpoint (an index), e.g. 300MB")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rank-main", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(*args.rank_main)
        return
    with tempfile.TemporaryDirectory(prefix="mathctl-fsdp-load-") as tmp:
        work = Path(tmp)
        folder = work / "model"
        # in a child process, so this one's memory stays out of the way
        code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.fsdp_load import build; from pathlib import Path; " \
               f"print(build(Path({str(folder)!r}), {args.layers}, {args.max_shard_size!r}))"
        params = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])
        model_gb = params * 4 / 1e9
        rows = []
        for mode in ("full", "sharded"):
            for r in run_mode(mode, folder, work):
                load_gb = (r["peak_kb"] - r["baseline_kb"]) * 1024 / 1e9
                rows.append({"mode": mode, "rank": r["rank"], "baseline_gb": round(r["baseline_kb"] * 1024 / 1e9, 3),
                             "peak_gb": round(r["peak_kb"] * 1024 / 1e9, 3), "load_peak_gb": round(load_gb, 3),
                             "load_peak_x_model": round(load_gb / model_gb, 3),
                             "local_shard_gb": round(r["local_shard_bytes"] / 1e9, 3)})
    result = {"params": params, "model_fp32_gb": round(model_gb, 3), "layers": args.layers,
              "checkpoint": f"safetensors, shards of {args.max_shard_size}" if args.max_shard_size else "safetensors, one file",
              "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"model: {params / 1e6:.0f}M parameters, {model_gb:.2f} GB fp32 ({result['checkpoint']}); 2 FSDP2 processes, gloo")
    print(f"{'load':8} {'rank':>4} {'baseline GB':>12} {'peak GB':>8} {'peak - baseline':>16} {'x model':>8} {'own shard GB':>13}")
    for row in rows:
        print(f"{row['mode']:8} {row['rank']:>4} {row['baseline_gb']:>12.3f} {row['peak_gb']:>8.3f} "
              f"{row['load_peak_gb']:>16.3f} {row['load_peak_x_model']:>8.2f} {row['local_shard_gb']:>13.3f}")
    worst = max(r["load_peak_x_model"] for r in rows if r["mode"] == "sharded")
    print(f"sharded load, worst rank: {worst:.2f}x the model (goal <= 0.6x)")


if __name__ == "__main__":
    main()
