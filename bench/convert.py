"""Checkpoint conversion speed and memory: `mathctl convert-ckpt` DCP -> HF, streamed, against loading
the whole checkpoint into memory first.

What is measured
    A random Qwen2-architecture model of about `--gb` GB (bf16, untied embeddings) is written once as
    a DCP checkpoint (several .distcp files, as a multi-threaded save writes them). Then, each in a
    fresh subprocess, one after the other:
      stream    `mathctl convert-ckpt DCP OUT --shard-size S` (in-process `convert`): groups of at
                most S bytes are read with one `dcp.load` each, written as a safetensors shard, read
                back and checksummed
      load-all  the usual script: `dcp.load` of the full state dict into memory, then the same
                safetensors shards written with `save_file` (no read-back)
    GB/s = model bytes / wall seconds of the conversion (imports and the config read excluded).
    Peak RSS = the process's maximum resident set (VmHWM) and that peak minus the RSS before the
    conversion started (imports, interpreter), which is what the conversion itself costs.
    The target is peak above baseline <= ~1.2 x the largest shard + the largest tensor.

Run
    python bench/convert.py                      # ~2 GB model, 500MB shards
    python bench/convert.py --gb 1 --shard-size 250MB
    python bench/convert.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="model size in GB, bf16 (default 2)")
    p.add_argument("--shard-size", default="500MB", help="output shard size for both sides (default 500MB)")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--_side", choices=["stream", "load-all"], help=argparse.SUPPRESS)
    p.add_argument("--_src", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """VmHWM: this process image's peak RSS (getrusage's ru_maxrss would carry the parent's peak
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_checkpoint(folder: Path, gb: float) -> dict[str, Any]:
    """A config sized to about `gb` GB of bf16 weights, and its random weights saved as DCP."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 2 * (hidden * hidden * 2 + hidden * 256 * 2 + 3 * hidden * inter)  # q,o + k,v (GQA) + mlp, bytes
    layers = max(1, round((gb * 1e9 - 2 * 2 * vocab * hidden) / per_layer))
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16) for name, p in model.named_parameters()}
    folder.mkdir(parents=True)
    dcp.save(state, storage_writer=FileSystemWriter(str(folder), thread_count=4))
    config.save_pretrained(folder)
    sizes = [t.nbytes for t in state.values()]
    return {"layers": layers, "bytes": sum(sizes), "largest_tensor": max(sizes), "tensors": len(sizes),
            "files": len(list(folder.glob("*.distcp")))}


def side_stream(args: argparse.Namespace) -> dict[str, Any]:
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401 - imports before the baseline and the clock
    from transformers import AutoModelForCausalLM  # noqa: F401

    from mathctl.convert import convert

    base = _rss_now()
    began = time.perf_counter()
    summary = convert(Path(args._src), Path(args._out), fmt_from="dcp", shard_size=args.shard_size, progress_bar=False)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "bytes": summary["written_bytes"], "baseline": base, "peak": _peak(),
            "files": len([f for f in summary["files"] if f.endswith(".safetensors")])}


def side_load_all(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from mathctl.convert import parse_size

    base = _rss_now()
    began = time.perf_counter()
    reader = FileSystemReader(args._src)
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader)
    limit = parse_size(args.shard_size)
    out = Path(args._out)
    out.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    size = files = 0
    for key, tensor in state.items():
        if shard and size + tensor.nbytes > limit:
            files += 1
            save_file(shard, str(out / f"model-{files:05d}.safetensors"))
            shard, size = {}, 0
        shard[key] = tensor
        size += tensor.nbytes
    if shard:
        files += 1
        save_file(shard, str(out / f"model-{files:05d}.safetensors"))
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "bytes": sum(t.nbytes for t in state.values()), "baseline": base, "peak": _peak(),
            "files": files}


def run_side(side: str, src: Path, out: Path, shard_size: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.abspath(__file__), "--shard-size", shard_size, "--_side", side,
           "--_src", str(src), "--_out", str(out), "--_result", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {side} run failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
    data = json.loads(result.read_text())
    result.unlink()
    return data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._side:
        result = side_stream(args) if args._side == "stream" else side_load_all(args)
        Path(args._result).write_text(json.dumps(result))
        return
    from mathctl.convert import parse_size

    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=args.workdir) as tmp:
        src = Path(tmp) / "dcp"
        began = time.perf_counter()
        model = make_checkpoint(src, args.gb)
        model["write_seconds"] = round(time.perf_counter() - began, 1)
        report: dict[str, Any] = {"model": model, "shard_size": args.shard_size, "cpu_count": os.cpu_count()}
        for side in ("stream", "load-all"):
            r = run_side(side, src, Path(tmp) / f"out-{side}", args.shard_size)
            r["gb_per_s"] = r["bytes"] / 1e9 / r["seconds"]
            r["above_baseline"] = r["peak"] - r["baseline"]
            report[side] = r
    shard = min(parse_size(args.shard_size), model["bytes"])
    report["target_bytes"] = int(1.2 * shard + model["largest_tensor"])
    if args.json:
        print(json.dumps(report))
        return
    gb = 1e9
    print(f"DCP -> HF: random Qwen2-shaped model, {model['layers']} layers, {model['tensors']} tensors, "
          f"{model['bytes'] / gb:.2f} GB bf16 in {model['files']} .distcp files; largest tensor "
          f"{model['largest_tensor'] / gb:.3f} GB; output shards of {args.shard_size}")
    print(f"{'':9} {'GB/s':>6} {'seconds':>8} {'peak RSS GB':>12} {'above base GB':>14} {'shards':>7}")
    for side in ("stream", "load-all"):
        r = report[side]
        print(f"{side:9} {r['gb_per_s']:6.2f} {r['seconds']:8.2f} {r['peak'] / gb:12.2f} {r['above_baseline'] / gb:14.2f} "
              f"{r['files']:7d}")
    print(f"target for streaming: above-baseline peak <= 1.2 x shard + largest tensor = {report['target_bytes'] / gb:.2f} GB"
          f" -> {'met' if report['stream']['above_baseline'] <= report['target_bytes'] else 'NOT met'}")
    print("stream also reads every shard back and checksums it; load-all does not")


if __name__ == "__main__":
    main()
