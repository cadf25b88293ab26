"""Writing the target (HF safetensors shards, DCP, `.pt`, OLMo), verifying it, and `convert` itself."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mathctl.convert.formats import (
    _ST_DTYPES,
    DTYPES,
    OLMO_NAMES,
    TO_FORMATS,
    TOKENIZER_FILES,
    Entry,
    Source,
    parse_size,
)
from mathctl.convert.plan import Plan, check_plan, expected_model, make_plan
from mathctl.convert.sources import _dcp_entries, _dcp_reader, _hf_to_olmo_view, detect_format, open_source
from mathctl.core.errors import CheckpointError, ConfigError

# --- building and writing --------------------------------------------------------------------


def _groups(targets: list[Entry], limit: int) -> list[list[Entry]]:
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in targets:
        if groups[-1] and size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return [g for g in groups if g]


def _build_group(source: Source, plan: Plan, group: list[Entry], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    wanted = []
    for entry in group:
        wanted += plan.sources[entry.key]
        wanted += list(plan.merges.get(entry.key, ()))
    read = source.read(wanted)
    out: dict[str, torch.Tensor] = {}
    for entry in group:
        tensor = read.pop(plan.sources[entry.key][0])
        if entry.key in plan.merges:
            a_key, b_key = plan.merges[entry.key]
            a, b = read.pop(a_key), read.pop(b_key)
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * source.lora["scale"]
            if source.lora.get("fan_in_fan_out"):
                delta = delta.T
            tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[entry.key] = tensor.contiguous()
    return out


def _digest(tensor: torch.Tensor) -> str:
    """CRC-32 and length of the tensor's bytes (catches truncated or corrupted writes at ~3 GB/s)."""
    if not tensor.numel():
        return "0:0"
    data = memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return f"{zlib.crc32(data):08x}:{tensor.nbytes}"


@dataclass
class Result:
    tensors: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    digests: dict[str, str] = field(default_factory=dict)


_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory (safetensors'
    `save_file` first copies every tensor to `bytes`, doubling the memory of a shard)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": _ST_CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps mid-sized frees in its arenas)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_hf(source: Source, plan: Plan, tmp: Path, shard_size: int, dtype: torch.dtype | None,
              advance: Callable[..., None]) -> Result:
    result = Result()
    final_dtype = lambda e: dtype if dtype is not None and e.dtype.is_floating_point else e.dtype  # noqa: E731
    sized = [Entry(e.key, e.shape, final_dtype(e)) for e in plan.targets]
    groups = _groups(sized, shard_size)
    total = len(groups)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        name = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors = _build_group(source, plan, group, dtype)
        digests = {k: _digest(v) for k, v in tensors.items()}
        save_safetensors(tensors, tmp / name)
        result.bytes += sum(v.nbytes for v in tensors.values())
        del tensors
        _release_memory()
        _verify_safetensors(tmp / name, digests)
        result.digests.update(digests)
        result.tensors += len(digests)
        result.files.append(name)
        weight_map.update({k: name for k in digests})
        advance(sum(e.nbytes for e in group))
    if total > 1:
        index = {"metadata": {"total_size": result.bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return result


def _verify_safetensors(path: Path, digests: dict[str, str]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if sorted(names) != sorted(digests):
            raise CheckpointError(f"verification failed: {path.name} holds {len(names)} tensors, {len(digests)} written")
        for name in names:
            if _digest(f.get_tensor(name)) != digests[name]:
                raise CheckpointError(f"verification failed: {name} in {path.name} differs from what was written",
                                      hint="the disk may be full or failing; the output was not kept")


def _lazy_planner(build: Callable[[str], torch.Tensor]):
    """A DCP save planner for a state dict of meta tensors: each tensor is built from the source only
    when the writer asks for it, so memory holds one group, not the model."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class Planner(DefaultSavePlanner):
        def resolve_data(self, write_item):  # noqa: ANN001 - DCP's signature
            return build(write_item.index.fqn)

    return Planner()


def _write_dcp(source: Source, plan: Plan, tmp: Path, shard_size: int, dtype: torch.dtype | None,
               advance: Callable[..., None]) -> Result:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    final_dtype = lambda e: dtype if dtype is not None and e.dtype.is_floating_point else e.dtype  # noqa: E731
    entries = {e.key: Entry(e.key, e.shape, final_dtype(e)) for e in plan.targets}
    group_of: dict[str, int] = {}
    groups = _groups(list(entries.values()), shard_size)
    for i, group in enumerate(groups):
        for e in group:
            group_of[e.key] = i
    cache: dict[str, torch.Tensor] = {}
    current = [-1]
    digests: dict[str, str] = {}

    def build(key: str) -> torch.Tensor:
        if key not in cache:
            index = group_of[key]
            if index != current[0]:
                cache.clear()
                current[0] = index
                cache.update(_build_group(source, plan, [e for e in groups[index] if e.key in entries], dtype))
                for k, v in cache.items():
                    digests[k] = _digest(v)
                advance(sum(e.nbytes for e in groups[index]))
        return cache.pop(key)

    # the writer asks for tensors in the order of the state dict: group by group
    state = {key: torch.empty(e.shape, dtype=e.dtype, device="meta") for key, e in entries.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        dcp.save(state, storage_writer=FileSystemWriter(str(tmp), thread_count=1, single_file_per_rank=True),
                 planner=_lazy_planner(build))
    cache.clear()
    result = Result(tensors=len(digests), bytes=sum(e.nbytes for e in entries.values()),
                    files=sorted(p.name for p in tmp.iterdir()), digests=digests)
    reader = _dcp_reader(tmp)
    back = _dcp_entries(tmp)
    if sorted(back) != sorted(entries):
        raise CheckpointError(f"verification failed: the DCP output holds {len(back)} tensors, {len(entries)} written")
    for group in groups:
        for key, tensor in reader([e.key for e in group]).items():
            if _digest(tensor) != digests[key]:
                raise CheckpointError(f"verification failed: {key} differs from what was written")
    return result


def _write_torch(source: Source, plan: Plan, path: Path, dtype: torch.dtype | None,
                 advance: Callable[..., None]) -> Result:
    """One `.pt` pickle: the whole state is in memory while it is written (torch.save needs it)."""
    state = _build_group(source, plan, plan.targets, dtype)
    digests = {k: _digest(v) for k, v in state.items()}
    torch.save(state, path)
    advance(sum(v.nbytes for v in state.values()))
    result = Result(tensors=len(state), bytes=sum(v.nbytes for v in state.values()), files=[path.name], digests=digests)
    del state
    back = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if sorted(back) != sorted(digests) or any(_digest(back[k]) != d for k, d in digests.items()):
        raise CheckpointError(f"verification failed: {path.name} differs from what was written")
    return result


def _write_side_files(tmp: Path, model_dir: str | None, config: Any, dtype: torch.dtype | None,
                      trust_remote_code: bool) -> list[str]:
    """config.json (dtype updated), generation_config.json and the tokenizer files."""
    written = []
    if config is not None:
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        written.append("config.json")
    if model_dir is None:
        return written
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(config) if config is not None else None
    if generation is not None:
        generation.save_pretrained(tmp)
        written.append("generation_config.json")
    local = Path(model_dir)
    copied = [name for name in TOKENIZER_FILES if (local / name).is_file()] if local.is_dir() else []
    for name in copied:
        shutil.copy2(local / name, tmp / name)
    written += copied
    if not copied:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).save_pretrained(tmp)
            written.append("tokenizer")
        except (OSError, ValueError):
            pass
    return written


def convert(src: Path, dst: Path | None, *, fmt_from: str | None = None, fmt_to: str = "hf",
            base_model: str | None = None, dtype: str = "auto", shard_size: str | int = "5GB",
            dry_run: bool = False, allow_missing: bool = False, trust_remote_code: bool = False,
            progress_bar: bool = True) -> dict[str, Any]:
    """Convert SRC to DST; returns a summary (also the `--json` output)."""
    from mathctl.core.console import progress

    began = time.perf_counter()
    src = Path(src).expanduser()
    if not src.exists():
        raise ConfigError(f"checkpoint {src} does not exist", hint="check the SRC path")
    if fmt_to not in TO_FORMATS:
        raise ConfigError(f"unknown target format '{fmt_to}'", hint=f"--to one of: {', '.join(TO_FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'", hint="--dtype auto, bf16, fp16 or fp32")
    limit = parse_size(shard_size)
    fmt = fmt_from or detect_format(src)
    if dst is not None:
        dst = Path(dst).expanduser()
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise ConfigError(f"output {dst} already exists and is not an empty folder",
                              hint="choose a new DST; nothing was overwritten")
    elif not dry_run:
        raise ConfigError("no DST given", hint="mathctl convert-ckpt SRC DST (or --dry-run to list the mapping)")
    if base_model is not None:
        from mathctl.models import resolve_model_path

        base_model = resolve_model_path(base_model)  # tiny:PRESET, a folder, or a hub id
    source = open_source(src, fmt, base_model=base_model)
    try:
        if fmt_to in OLMO_NAMES:
            from mathctl.convert.instella import is_instella_config

            if not is_instella_config(source.model_dir):
                raise ConfigError(f"--to {fmt_to} needs an Instella model, but {source.model_dir or src} has no "
                                  "config.json with model_type instella",
                                  hint="convert a Hugging Face Instella folder, or give its config with --base-model")
            if allow_missing:
                raise ConfigError(f"--allow-missing cannot be used with --to {fmt_to}",
                                  hint="Instella's layout needs every tensor; leave --allow-missing out")
        expected = expected_model(source.model_dir, trust_remote_code)
        if fmt_to in ("hf", *OLMO_NAMES) and expected is None:
            raise ConfigError(f"{src} has no config.json and no --base-model was given; a Hugging Face folder needs one",
                              hint="pass --base-model with the model's hub id or a folder holding its config and tokenizer")
        olmo_dims = None
        if fmt_to in OLMO_NAMES:  # Hugging Face names first (wrappers, LoRA merges, checks), then fused
            source, expected, olmo_dims = _olmo_target(source, expected, src)
        plan = make_plan(source, expected)
        target_dtype = DTYPES[dtype]
        summary: dict[str, Any] = {
            "source": str(src), "from": fmt, "to": fmt_to, "output": str(dst) if dst else None,
            "base_model": source.model_dir if source.staged is None else None, "notes": source.notes,
            "tensors": len(plan.targets),
            "bytes": sum((e.nbytes if target_dtype is None or not e.dtype.is_floating_point
                          else math.prod(e.shape) * torch.empty((), dtype=target_dtype).element_size()) for e in plan.targets),
            "largest_tensor_bytes": max((e.nbytes for e in plan.targets), default=0),
            "dropped": plan.dropped, "missing": plan.missing, "unexpected": plan.unexpected,
            "mismatched": plan.mismatched, "tied": plan.tied, "lora_merged": sorted(plan.merges),
        }
        if dry_run:
            final = {t: e for e in plan.targets for t in [e.key]}
            origins = source.origins or {}
            summary["mapping"] = [{"source": o, "target": t, "shape": list(source.entries[s].shape),
                                   "dtype": str(target_dtype or source.entries[s].dtype).replace("torch.", ""),
                                   "written": t in final and plan.sources.get(t, [None])[0] == s}
                                  for s, t in plan.mapping for o in origins.get(s, [s])]
            if source.gguf is not None:
                summary["gguf"] = source.gguf
            summary["status"] = "dry-run"
            return summary
        check_plan(plan, allow_missing)
        assert dst is not None
        if source.prepare is not None:
            source.prepare()
        single_file = fmt_to in ("torch", *OLMO_NAMES) and dst.suffix in (".pt", ".bin", ".pth")
        tmp = dst.parent / f".{dst.name}.tmp"
        if tmp.is_dir():  # a leftover of an interrupted conversion
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        if single_file:
            dst.parent.mkdir(parents=True, exist_ok=True)
        else:
            tmp.mkdir(parents=True)
        side: list[str] = []
        try:
            with progress(f"{fmt} -> {fmt_to}", summary["bytes"], enabled=progress_bar) as advance:
                if fmt_to == "hf":
                    result = _write_hf(source, plan, tmp, limit, target_dtype, advance)
                elif fmt_to == "dcp":
                    result = _write_dcp(source, plan, tmp, limit, target_dtype, advance)
                else:
                    result = _write_torch(source, plan, tmp if single_file else tmp / "model.pt", target_dtype, advance)
            if not single_file and olmo_dims is not None:  # config.yaml for Instella's trainer, config.json for the way back
                from mathctl.convert.instella import write_olmo_side_files

                side = write_olmo_side_files(tmp, source.model_dir, olmo_dims, TOKENIZER_FILES)
            elif not single_file and expected is not None:  # config and tokenizer travel with the weights
                from mathctl.convert.instella import copy_remote_code

                side = _write_side_files(tmp, source.model_dir, expected[0], target_dtype, trust_remote_code)
                side += copy_remote_code(source.model_dir, tmp)
            if dst.is_dir():
                dst.rmdir()
            tmp.rename(dst)
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise
        seconds = time.perf_counter() - began
        summary.update(status="completed", files=result.files + side, written_tensors=result.tensors,
                       written_bytes=result.bytes, verified=True, seconds=round(seconds, 3),
                       gb_per_s=round(result.bytes / 1e9 / max(seconds, 1e-9), 3))
        return summary
    finally:
        if source.staged is not None:  # a GGUF's config and tokenizer, staged for the writers
            shutil.rmtree(source.staged, ignore_errors=True)


def _olmo_target(source: Source, expected: tuple[Any, dict[str, Entry], dict[str, str]],
                 src: Path) -> tuple[Source, tuple[Any, dict[str, Entry], dict[str, str]], Any]:
    """`--to olmo`: the source's tensors under Hugging Face Instella names (a plan checked against the
    config, LoRA merged), seen through a view that fuses them into Instella's OLMo-style names."""
    from mathctl.convert.instella import dims_from_hf, olmo_layout, read_json_config

    dims = dims_from_hf(read_json_config(source.model_dir) or {}, f"{source.model_dir}/config.json")
    hf_plan = make_plan(source, expected)
    check_plan(hf_plan, allow_missing=False)
    by_key = {e.key: e for e in hf_plan.targets}
    planned = Source(source.kind, source.path, by_key,
                     lambda keys: _build_group(source, hf_plan, [by_key[k] for k in keys], None),
                     model_dir=source.model_dir, notes=source.notes, staged=source.staged)
    view = _hf_to_olmo_view(planned, dims, str(src))
    olmo = {name: Entry(name, shape, torch.float32) for name, shape in olmo_layout(dims).items()}
    return view, (None, olmo, {}), dims


def iter_mapping_rows(summary: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    for row in summary.get("mapping", []):
        yield row["source"], row["target"] if row["written"] else f"({row['target']}: not written)", \
            "x".join(map(str, row["shape"])) or "scalar", row["dtype"]
