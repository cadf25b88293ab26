"""`mathctl convert-ckpt`: checkpoints between PyTorch DCP, `.pt` state dicts, mathctl's FSDP run
checkpoints, LoRA adapters and Hugging Face folders.

    mathctl convert-ckpt SRC DST [--from hf|dcp|fsdp|torch|lora|gguf|verl|olmo] [--to hf|dcp|torch|olmo]
                         [--base-model M]

Sources (`--from`, detected when left out):
    hf     a Hugging Face folder: model.safetensors, or shards + model.safetensors.index.json
    dcp    a `torch.distributed.checkpoint` folder (`.metadata` + `*.distcp`), e.g. NeMo RL's
           `weights/`; a top-level `model.` group beside optimiser state is unwrapped
    fsdp   a mathctl sft/rm/grpo run folder (its newest complete checkpoint) or one
           `checkpoints/step_N/` folder, written by any number of FSDP ranks: DCP underneath, with the
           run's LoRA adapters merged and config/tokenizer taken from the run
    torch  a `.pt`/`.bin`/`.pth` state dict (loaded with `weights_only=True`, memory-mapped), also
           nested under `state_dict`/`model`/`module`
    lora   a peft adapter folder (adapter_config.json + adapter_model.safetensors) merged into its
           base (`--base-model`, default the adapter's `base_model_name_or_path`)
    gguf   a llama.cpp `.gguf` file (detected by its extension or its `GGUF` magic bytes), read
           by transformers' GGUF loader and dequantised to float32; config, generation config and
           tokenizer (with its chat template) are rebuilt from the file's metadata
    verl   a verl/SkyRL FSDP actor folder: one `model_world_size_W_rank_R.pt` per rank (DTensor shards,
           loaded weights-only), `fsdp_config.json`, `huggingface/`; LoRA merged (`convert_verl.py`)
    olmo   (alias instella) Instella's unsharded OLMo-style `model.pt` + `config.yaml`, seen under
           Hugging Face Instella names with fused q/k/v and up/gate split (`convert_instella.py`)

Targets (`--to`): hf (default), dcp, torch (one `.pt`), and olmo/instella, which fuses a Hugging Face
Instella model back into Instella's `model.pt` + `config.yaml`.

Key surgery (every source): wrapper segments that training code inserts are removed anywhere in a
name (`_fsdp_wrapped_module.`, `_orig_mod.` from torch.compile, `_checkpoint_wrapped_module.`,
leading `module.` from DDP), then the `model.` prefix is added or removed, whichever matches the
model the config describes; a tied output embedding (`lm_head.weight` sharing the input embedding)
is written once, as `save_pretrained` does; stale `rotary_emb.inv_freq` buffers are dropped. Of a
peft `modules_to_save` module (a reward model's `score` head), which a LoRA state dict holds as
`original_module` and as the trained `modules_to_save.default`, the trained copy is written (see
`_copy_rank`; an adapter folder's copy likewise replaces the base's).

Checks: with a config (the source's, or `--base-model`'s) the names and shapes are compared with
the model it builds on the meta device; missing names (unless `--allow-missing`), unexpected names
and shape mismatches are listed and exit 2. After writing, every output file is read back and
each tensor's count and CRC-32 checksum compared with what was written.

Memory: HF and DCP outputs are written in groups of at most `--shard-size` bytes, read from the
source group by group (DCP: one `dcp.load` per group, which reads only those tensors' byte ranges;
safetensors and `.pt` are memory-mapped), so the peak stays near one output shard plus the largest
tensor whatever the model size. A `.pt` output is one pickle and needs the whole state in memory,
and a GGUF source is dequantised whole (the float32 model is in memory while it is written).
"""

from __future__ import annotations

import json
import math
import re
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

from mathctl.core.errors import CheckpointError, ConfigError

FROM_FORMATS = ("hf", "dcp", "fsdp", "torch", "lora", "gguf", "verl", "olmo", "instella")
TO_FORMATS = ("hf", "dcp", "torch", "olmo", "instella")
OLMO_NAMES = ("olmo", "instella")  # one layout: Instella's OLMo-style unsharded model.pt
DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
WRAPPERS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
DROPPABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / a byte count -> bytes (GB = 10^9, as Hugging Face counts)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ConfigError(f"cannot read the size '{text}'", hint="write e.g. 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size < 1:
        raise ConfigError(f"shard size '{text}' is below one byte", hint="e.g. --shard-size 5GB")
    return size


# --- tensors in a source ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Source:
    """Tensors by name (`entries`) and a way to read a group of them."""

    kind: str
    path: Path
    entries: dict[str, Entry]
    reader: Callable[[list[str]], dict[str, torch.Tensor]]
    model_dir: str | None = None  # where config / tokenizer / generation config can come from
    notes: list[str] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # {"scale": float, "fan_in_fan_out": bool} when peft names are present
    gguf: dict[str, Any] | None = None  # a GGUF source: architecture and the file's own tensors (--dry-run)
    prepare: Callable[[], None] | None = None  # called once before anything is written
    staged: Path | None = None  # a temporary folder (model_dir) removed when the conversion ends
    origins: dict[str, list[str]] | None = None  # a renaming view: its key -> the stored names it is made of

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return self.reader(keys)


def detect_format(src: Path) -> str:
    from mathctl.convert_verl import find_actor_folder

    if src.is_file():
        if src.suffix == ".safetensors":
            return "hf"
        if src.suffix == ".gguf" or _has_gguf_magic(src):
            return "gguf"
        return "torch"
    if (src / "adapter_config.json").is_file():
        return "lora"
    if find_actor_folder(src) is not None:
        return "verl"
    if (src / "model.pt").is_file() and (src / "config.yaml").is_file():
        return "olmo"
    if (src / ".metadata").is_file():
        return "dcp"
    if (src / "dcp" / ".metadata").is_file() or (src / "checkpoints").is_dir():
        return "fsdp"
    if any(src.glob("*.safetensors")):
        return "hf"
    if [p for p in src.iterdir() if p.suffix in (".pt", ".bin", ".pth")]:
        return "torch"
    if any(src.glob("*.gguf")):
        return "gguf"
    raise ConfigError(f"cannot tell the checkpoint format of {src}",
                      hint=f"name it with --from ({', '.join(FROM_FORMATS)})")


def open_source(src: Path, fmt: str, *, base_model: str | None) -> Source:
    if not src.exists():
        raise ConfigError(f"checkpoint {src} does not exist", hint="check the SRC path")
    if fmt not in FROM_FORMATS:
        raise ConfigError(f"unknown source format '{fmt}'", hint=f"--from one of: {', '.join(FROM_FORMATS)}")
    opener = {"hf": _open_hf, "dcp": _open_dcp, "fsdp": _open_run, "torch": _open_torch, "lora": _open_lora,
              "gguf": _open_gguf, "verl": _open_verl, "olmo": _open_olmo, "instella": _open_olmo}[fmt]
    source = opener(src, base_model)
    if not source.entries:
        raise CheckpointError(f"{src} holds no tensors", hint=f"is it a {fmt} checkpoint? name the format with --from")
    return source


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _safetensors_entries(files: list[Path]) -> tuple[dict[str, Entry], dict[str, Path]]:
    entries: dict[str, Entry] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            header = _safetensors_header(file)
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})",
                                  hint="the file may be cut short; copy it again") from None
        for name, info in header.items():
            if info["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which this converter does not handle")
            entries[name] = Entry(name, tuple(info["shape"]), _ST_DTYPES[info["dtype"]])
            where[name] = file
    return entries, where


def _safetensors_reader(where: dict[str, Path]) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(where[key], []).append(key)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        return out

    return read


def _open_hf(src: Path, base_model: str | None) -> Source:
    if src.is_file():
        files = [src]
        folder = src.parent
    else:
        folder = src
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({src / name for name in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{src}: the index names shards that are not there: {', '.join(absent[:3])}",
                                      hint="copy the missing shards")
        else:
            files = sorted(src.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in src.glob("*.bin"))
            hint = f"it holds {bins[0]}: convert it with --from torch" if bins else "point SRC at a model folder"
            raise CheckpointError(f"{src} has no .safetensors files", hint=hint)
    entries, where = _safetensors_entries(files)
    model_dir = str(folder) if (folder / "config.json").is_file() else None
    return Source("hf", src, entries, _safetensors_reader(where), model_dir=base_model or model_dir)


# DCP ------------------------------------------------------------------------------------------


def _dcp_metadata(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign .metadata file
        raise CheckpointError(f"cannot read the DCP metadata of {folder} ({type(exc).__name__}: {exc})",
                              hint="is the checkpoint complete? a DCP folder holds .metadata and *.distcp files") from None


def _dcp_entries(folder: Path, metadata=None) -> dict[str, Entry]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = metadata or _dcp_metadata(folder)
    return {key: Entry(key, tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}


def _dcp_reader(folder: Path) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """Read whole tensors from a DCP folder. Each stored chunk is a `torch.save` zip inside a .distcp
    file; when it holds plain little-endian contiguous data for its slice of the tensor, the bytes
    are read straight into the output tensor (no intermediate copies, which `dcp.load` makes two of
    per tensor). Anything else (transforms, views, other byte orders) goes through `dcp.load`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = _dcp_metadata(folder)
    entries = _dcp_entries(folder, metadata)
    by_fqn: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in metadata.storage_data.items():
        by_fqn.setdefault(index.fqn, []).append((index, info))

    def fallback(keys: list[str]) -> dict[str, torch.Tensor]:
        state = {key: torch.empty(entries[key].shape, dtype=entries[key].dtype) for key in keys}
        with warnings.catch_warnings():  # one process, no process group: intended
            warnings.filterwarnings("ignore", message=".*torch.distributed.*")
            dcp.load(state, storage_reader=FileSystemReader(str(folder)))
        return state

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        slow: list[str] = []
        handles: dict[str, Any] = {}
        try:
            for key in keys:
                target = torch.empty(entries[key].shape, dtype=entries[key].dtype)
                meta = metadata.state_dict_metadata[key]
                chunks = {tuple(c.offsets): tuple(c.sizes) for c in meta.chunks}
                ok = bool(by_fqn.get(key))
                for index, info in by_fqn.get(key, []):
                    sizes = chunks.get(tuple(index.offset))
                    if sizes is None or info.transform_descriptors:
                        ok = False
                        break
                    view = target
                    for dim, (start, size) in enumerate(zip(index.offset, sizes)):
                        view = view.narrow(dim, start, size)
                    if not view.is_contiguous():
                        ok = False
                        break
                    handle = handles.get(info.relative_path)
                    if handle is None:
                        handle = handles[info.relative_path] = (folder / info.relative_path).open("rb")
                    if not _read_saved_tensor_into(handle, info.offset, info.length, view):
                        ok = False
                        break
                if ok:
                    out[key] = target
                else:
                    slow.append(key)
        finally:
            for handle in handles.values():
                handle.close()
        if slow:
            out.update(fallback(slow))
        return out

    return read


class _RebuildRecorder(__import__("pickle").Unpickler):
    """Reads a `torch.save` data.pkl of one tensor without building it: records storage offset, size
    and stride of `_rebuild_tensor_v2`; refuses anything else."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise __import__("pickle").UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):  # noqa: ANN001, ANN201
        return tuple(pid)


def _read_saved_tensor_into(handle, offset: int, length: int, view: torch.Tensor) -> bool:
    """Fill `view` from the `torch.save` zip at [offset, offset+length) of `handle` when that zip
    holds exactly `view`'s bytes (contiguous, storage offset 0, little-endian, stored uncompressed)."""
    import io
    import pickle
    import zipfile

    handle.seek(offset)
    blob_view = _FileWindow(handle, offset, length)
    try:
        archive = zipfile.ZipFile(blob_view)
        names = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
        if "byteorder" in names and archive.read(names["byteorder"]).decode().strip() != "little":
            return False
        record = _RebuildRecorder(io.BytesIO(archive.read(names["data.pkl"]))).load()
        data = names.get(f"data/{record[1][2]}") if isinstance(record, tuple) and record[0] == "tensor" else None
    except (KeyError, pickle.UnpicklingError, zipfile.BadZipFile, IndexError, TypeError, ValueError):
        return False
    if data is None or data.compress_type != zipfile.ZIP_STORED or data.file_size != view.nbytes:
        return False
    _, storage, storage_offset, size, stride = record
    stored_dtype = _STORAGE_DTYPES.get(str(storage[1]))
    if stored_dtype != view.dtype:
        return False
    contiguous = tuple(torch.empty(size, device="meta").stride()) if size else ()
    if storage_offset != 0 or size != tuple(view.shape) or (stride != contiguous and view.numel() > 1):
        return False
    handle.seek(offset + data.header_offset)
    local = handle.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    handle.seek(offset + data.header_offset + 30 + name_len + extra_len)
    if view.numel():
        handle.readinto(memoryview(view.view(-1).view(torch.uint8).numpy()))
    return True


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _FileWindow:
    """A seekable read-only window [offset, offset+length) of an open file, for zipfile."""

    def __init__(self, handle, offset: int, length: int):
        self.handle, self.offset, self.length, self.pos = handle, offset, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.handle.seek(self.offset + self.pos)
        data = self.handle.read(n)
        self.pos += len(data)
        return data


def _open_dcp(src: Path, base_model: str | None) -> Source:
    folder = src / "dcp" if (src / "dcp" / ".metadata").is_file() else src
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{src} is not a DCP checkpoint (no .metadata file)",
                              hint="point SRC at the folder that holds .metadata and the *.distcp files")
    raw = _dcp_entries(folder)
    reader = _dcp_reader(folder)
    if base_model is None:  # a DCP folder written by this converter keeps config and tokenizer beside it
        base_model = next((str(d) for d in (folder, src) if (d / "config.json").is_file()), None)
    groups = {key.split(".", 1)[0] for key in raw}
    notes = []
    training_state = {"optim", "optimizer", "optimizer_state", "scheduler", "lr_scheduler", "extra_state"}
    if "model" in groups and groups & training_state:  # {"model": ..., "optim": ...}: the model part only
        prefix = "model."
        notes.append(f"DCP groups {sorted(groups)}: converting the `model` group")
        entries = {key[len(prefix):]: Entry(key[len(prefix):], e.shape, e.dtype)
                   for key, e in raw.items() if key.startswith(prefix)}

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            got = reader([prefix + k for k in keys])
            return {k[len(prefix):]: v for k, v in got.items()}

        return Source("dcp", src, entries, read, model_dir=base_model, notes=notes)
    return Source("dcp", src, raw, reader, model_dir=base_model, notes=notes)


def _open_run(src: Path, base_model: str | None) -> Source:
    """A mathctl run folder (newest complete checkpoint) or one of its step folders."""
    step = src
    if (src / "checkpoints").is_dir():
        done = sorted(p for p in (src / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
        if not done:
            raise CheckpointError(f"run {src} has no complete checkpoint", hint="point SRC at a checkpoints/step_N folder")
        step = done[-1]
    if not (step / "dcp" / ".metadata").is_file():
        raise CheckpointError(f"{src} is not a mathctl checkpoint (no dcp/.metadata)",
                              hint="point SRC at a run folder or at its checkpoints/step_N/")
    source = _open_dcp(step, None)
    source.kind = "fsdp"
    run = step.parent.parent
    recipe = _read_recipe(run / "recipe.yaml")
    model_dir = base_model
    for candidate in (step / "hf", run / "final"):
        if model_dir is None and (candidate / "config.json").is_file():
            model_dir = str(candidate)
    if model_dir is None and recipe.get("model", {}).get("path"):
        from mathctl.models import resolve_model_path

        model_dir = resolve_model_path(str(recipe["model"]["path"]))
    source.model_dir = model_dir
    lora = recipe.get("lora") or {}
    if any(".lora_A." in key for key in source.entries):
        if not lora:
            raise CheckpointError(f"{step} holds LoRA adapters but {run / 'recipe.yaml'} has no lora section",
                                  hint="convert the run folder as written by mathctl, or merge the adapter with --from lora")
        source.lora = {"scale": float(lora.get("alpha", 32)) / float(lora.get("r", 16)), "fan_in_fan_out": False}
    source.notes.append(f"checkpoint {step.name} of run {run.name}")
    return source


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


# .pt ------------------------------------------------------------------------------------------


def _open_torch(src: Path, base_model: str | None) -> Source:
    file = src
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in (".pt", ".bin", ".pth"))
        if len(files) != 1:
            raise CheckpointError(f"{src} holds {len(files)} .pt/.bin/.pth files; one state dict file is expected",
                                  hint="point SRC at the file itself")
        file = files[0]
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refuses code objects, or the file is damaged
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {file} as a state dict with weights_only=True ({first})",
                              hint="only plain tensors (and dicts of them) are loaded; re-save it with "
                                   "torch.save(model.state_dict(), path)") from None
    notes = []
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((k for k in ("state_dict", "model", "module", "model_state_dict") if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        notes.append(f"state dict nested under '{nested}'")
        obj = obj[nested]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict",
                              hint="save model.state_dict(), not the model object")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = len(obj) - len(tensors)
    if skipped:
        notes.append(f"{skipped} non-tensor entries ignored")
    entries = {k: Entry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}
    model_dir = base_model or (str(file.parent) if (file.parent / "config.json").is_file() else None)
    return Source("torch", src, entries, lambda keys: {k: tensors[k] for k in keys}, model_dir=model_dir, notes=notes)


# LoRA -----------------------------------------------------------------------------------------


def _open_lora(src: Path, base_model: str | None) -> Source:
    config = json.loads((src / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{src} is a {config.get('peft_type')} adapter; only LoRA adapters are merged")
    if config.get("use_dora"):
        raise CheckpointError(f"{src} is a DoRA adapter, which this converter does not merge",
                              hint="merge it with peft's merge_and_unload()")
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{src}/adapter_config.json names no base model", hint="give --base-model")
    from mathctl.models import resolve_model_path

    base_dir = _local_model_dir(resolve_model_path(base))
    base_source = _open_hf(base_dir, None)
    files = sorted(src.glob("adapter_model*.safetensors"))
    if not files:
        raise CheckpointError(f"{src} has no adapter_model.safetensors", hint="save the adapter with safe_serialization")
    adapter, where = _safetensors_entries(files)
    read_adapter = _safetensors_reader(where)
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{src} uses per-module ranks or alphas (rank_pattern/alpha_pattern), not handled here",
                              hint="merge it with peft's merge_and_unload()")
    # peft names: base_model.model.<module>.lora_A.weight ; full copies: base_model.model.<name>
    entries = dict(base_source.entries)
    extra = {f"adapter::{k}": Entry(f"adapter::{k}", e.shape, e.dtype) for k, e in adapter.items()}

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        base_keys = [k for k in keys if not k.startswith("adapter::")]
        out = base_source.read(base_keys)
        names = [k[len("adapter::"):] for k in keys if k.startswith("adapter::")]
        out.update({f"adapter::{k}": v for k, v in read_adapter(names).items()})
        return out

    source = Source("lora", src, {**entries, **extra}, read, model_dir=str(base_dir),
                    notes=[f"LoRA r={r} alpha={alpha:g} scale={scale:g} merged into {base}"])
    source.lora = {"scale": scale, "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    return source


def _local_model_dir(path: str) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


# verl / SkyRL ---------------------------------------------------------------------------------


def _open_verl(src: Path, base_model: str | None) -> Source:
    """A verl/SkyRL FSDP actor folder (see `convert_verl`): whole tensors assembled from the ranks' shards."""
    from mathctl.convert_verl import open_verl

    checkpoint = open_verl(src)
    entries = {key: Entry(key, shape, dtype) for key, (shape, dtype) in checkpoint.tensors.items()}
    source = Source("verl", src, entries, checkpoint.read, model_dir=base_model or checkpoint.model_dir,
                    notes=checkpoint.notes)
    source.lora = checkpoint.lora  # peft names are renamed and merged by make_plan, as for a LoRA run
    return source


# Instella (OLMo-style) -------------------------------------------------------------------------


def _open_olmo(src: Path, base_model: str | None) -> Source:
    """Instella's unsharded checkpoint (folder with model.pt and config.yaml, or the .pt itself) seen
    under Hugging Face Instella names (see `convert_instella`); a config.json made from config.yaml is
    staged in a temporary folder with any tokenizer files found beside model.pt."""
    import tempfile

    from mathctl.convert_instella import olmo_checkpoint_config

    folder = src if src.is_dir() else src.parent
    file = src
    if src.is_dir():
        file = src / "model.pt"
        if not file.is_file():
            found = sorted(p.name for p in src.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
            if len(found) != 1:
                raise CheckpointError(f"{src} has no model.pt" + (f" (it holds {', '.join(found)})" if found else ""),
                                      hint="point SRC at Instella's unsharded checkpoint folder or at its model.pt")
            file = src / found[0]
    inner = _open_torch(file, None)
    dims, hf_config, model_dir, config_note = olmo_checkpoint_config(folder, base_model)
    source = _olmo_to_hf_view(inner, dims, str(file))
    source.notes += [f"Instella/OLMo layout: {dims.n_layers} layers, d_model {dims.d_model}, {dims.n_heads} heads "
                     f"({dims.n_kv_heads} key/value), output head {'tied' if dims.tied else 'untied'}", config_note]
    if model_dir is None:
        stage = Path(tempfile.mkdtemp(prefix="mathctl-instella-"))
        (stage / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)
        source.staged = stage
        model_dir = str(stage)
    source.model_dir = model_dir
    return source


def _olmo_to_hf_view(inner: Source, dims: Any, where: str) -> Source:
    """OLMo names -> Hugging Face Instella names; fused tensors are split on read (row views of the
    stored tensor, no copy)."""
    from mathctl.convert_instella import plain_olmo_names, split_plan

    by_name: dict[str, str] = {}
    for key, name in plain_olmo_names({k: strip_wrappers(k) for k in inner.entries}).items():
        if name in by_name:
            raise CheckpointError(f"{where}: {by_name[name]} and {key} are both {name}",
                                  hint="the state dict mixes wrapped and unwrapped copies; save one model's state dict")
        by_name[name] = key
    cut = split_plan({name: inner.entries[key].shape for name, key in by_name.items()}, dims, where)
    entries = {}
    for hf, (olmo, _, rows) in cut.items():
        stored = inner.entries[by_name[olmo]]
        entries[hf] = Entry(hf, (rows, *stored.shape[1:]), stored.dtype)

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        stored = inner.read(sorted({by_name[cut[k][0]] for k in keys}))
        return {k: stored[by_name[cut[k][0]]].narrow(0, cut[k][1], cut[k][2]) for k in keys}

    return Source("olmo", inner.path, entries, read, model_dir=inner.model_dir, notes=list(inner.notes),
                  origins={hf: [by_name[olmo]] for hf, (olmo, _, _) in cut.items()})


def _hf_to_olmo_view(inner: Source, dims: Any, where: str) -> Source:
    """Hugging Face Instella names -> OLMo names; q/k/v and up/gate are concatenated on read."""
    from mathctl.convert_instella import join_plan

    by_name = {strip_wrappers(k): k for k in inner.entries if not DROPPABLE.search(strip_wrappers(k))}
    joins = join_plan({name: inner.entries[key].shape for name, key in by_name.items()}, dims, where)
    entries = {}
    for olmo, parts in joins.items():
        stored = [inner.entries[by_name[hf]] for hf in parts]
        dtypes = {e.dtype for e in stored}
        if len(dtypes) > 1:
            raise CheckpointError(f"{where}: the parts of {olmo} have different dtypes ({sorted(map(str, dtypes))})",
                                  hint="give them one with --dtype")
        entries[olmo] = Entry(olmo, (sum(e.shape[0] for e in stored), *stored[0].shape[1:]), stored[0].dtype)

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        stored = inner.read(sorted({by_name[hf] for olmo in keys for hf in joins[olmo]}))
        out = {}
        for olmo in keys:
            parts = [stored[by_name[hf]] for hf in joins[olmo]]
            out[olmo] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out

    return Source(inner.kind, inner.path, entries, read, model_dir=inner.model_dir, notes=list(inner.notes),
                  origins=joins, staged=inner.staged)


# GGUF -----------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_value(reader: Any, name: str) -> Any:
    """A scalar or string metadata value of a GGUF file (None when absent)."""
    item = reader.fields.get(name)
    if item is None or not item.data:
        return None
    part = item.parts[item.data[0]]
    if item.types and int(item.types[0]) == 8:  # GGUFValueType.STRING
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) == 1 else part.tolist()


def read_gguf_header(path: Path) -> dict[str, Any]:
    """Architecture, a few metadata values and the tensor list of a GGUF file (memory-mapped: no tensor
    data is read). Shapes are in PyTorch order (GGUF stores the innermost dimension first)."""
    if not _has_gguf_magic(path):
        with path.open("rb") as f:
            head = f.read(4)
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})",
                              hint="give a llama.cpp .gguf model file, or name the format of SRC with --from")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("reading GGUF files needs the gguf package", hint="pip install 'gguf>=0.10'") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file
        raise CheckpointError(f"cannot read the GGUF file {path} ({type(exc).__name__}: {exc})",
                              hint="the file may be cut short; download it again") from None
    tensors = [{"name": t.name, "shape": [int(n) for n in reversed(t.shape.tolist())], "type": t.tensor_type.name,
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    types: dict[str, int] = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + 1
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    header = {"file": str(path), "architecture": _gguf_value(reader, "general.architecture"),
              "name": _gguf_value(reader, "general.name"), "tensor_types": types,
              "vocab": len(tokens.data) if tokens is not None else None, "tensors": tensors,
              "special_tokens": {key: _gguf_value(reader, f"tokenizer.ggml.{key}_token_id")
                                 for key in ("bos", "eos", "padding")}}
    del reader  # closes the memory map
    if not header["architecture"]:
        raise CheckpointError(f"{path} names no general.architecture", hint="is the file a model GGUF (not a LoRA or vocab-only file)?")
    return header


def _gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers reads (its two loaders' lists; empty if it moved them)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _gguf_quiet():
    """transformers' GGUF loader draws a tqdm bar per file and logs per tensor: keep stderr clean."""
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _open_gguf(src: Path, base_model: str | None) -> Source:
    """A GGUF file: the config comes from its metadata (staged as config.json in a temporary folder,
    with generation_config.json; the tokenizer is added there before writing), the tensors from
    transformers' loader, dequantised to float32 once, on the first read."""
    import tempfile

    import transformers
    from transformers import AutoConfig

    file = src
    if src.is_dir():
        files = sorted(src.glob("*.gguf"))
        if len(files) != 1:
            raise CheckpointError(f"{src} holds {len(files)} .gguf files; one is expected", hint="point SRC at the file itself")
        file = files[0]
    header = read_gguf_header(file)
    arch = header["architecture"]
    try:
        with _gguf_quiet():
            config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        known = _gguf_architectures()
        raise CheckpointError(f"transformers {transformers.__version__} cannot read GGUF architecture '{arch}' ({reason})",
                              hint=("architectures it reads: " + ", ".join(known)) if known else
                              "convert the original Hugging Face checkpoint instead") from None
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if getattr(config, attr, None) is None and header["special_tokens"][key] is not None:
            setattr(config, attr, header["special_tokens"][key])
    config.dtype = torch.float32  # what the dequantised weights are; --dtype casts them
    if not getattr(config, "architectures", None):  # GGUF metadata names none; vLLM and `expected_model` need it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    if hasattr(config, "_model_name_or_path"):  # transformers files general.name ("Smollm2 135M ...") as a path
        del config._model_name_or_path
    stage = Path(tempfile.mkdtemp(prefix="mathctl-gguf-"))
    try:
        config.save_pretrained(stage)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(stage)
        expected = expected_model(str(stage), False)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    assert expected is not None
    entries = {name: Entry(name, e.shape, torch.float32 if e.dtype.is_floating_point else e.dtype)
               for name, e in expected[1].items()}
    state: dict[str, torch.Tensor] = {}

    def load() -> None:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {}
        if hasattr(transformers, "GgufConfig"):  # plain dense layers whatever GGUF kernels are installed
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
        with _gguf_quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(file.parent), gguf_file=file.name, config=config, dtype=torch.float32, output_loading_info=True,
                **kwargs)
        missing = [k for k in info.get("missing_keys", ()) if k in entries]
        if missing:
            raise CheckpointError(f"{file}: {len(missing)} tensors of {type(model).__name__} were not found in the "
                                  f"GGUF file: {', '.join(sorted(missing)[:5])}",
                                  hint="the file's tensor names do not match what transformers expects of this architecture")
        state.update(model.state_dict())

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        if not state:
            load()
        return {key: state[key] for key in keys}

    def prepare() -> None:  # the tokenizer (vocabulary, merges, special tokens, chat template) from the metadata
        from transformers import AutoTokenizer

        with _gguf_quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        limit = getattr(config, "max_position_embeddings", None)
        if limit:  # the GGUF names none: the tokenizer would claim an unbounded context
            tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = limit
        for key in ("is_local", "local_files_only"):  # loading arguments, not tokenizer settings
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(stage)

    notes = [f"GGUF {arch} ({header['name'] or file.name}): {len(header['tensors'])} tensors "
             f"({', '.join(f'{n} {t}' for t, n in sorted(header['tensor_types'].items(), key=lambda x: -x[1]))}), "
             f"dequantised to float32"]
    if base_model:
        notes.append("--base-model is not used for a GGUF source: config and tokenizer come from the file")
    return Source("gguf", file, entries, read, model_dir=str(stage), notes=notes, gguf=header, prepare=prepare,
                  staged=stage)


# --- names: source -> target -----------------------------------------------------------------


@dataclass
class Plan:
    """Target tensors in write order, each made from source tensors by `build`."""

    targets: list[Entry]
    sources: dict[str, list[str]]  # target -> source keys it reads
    merges: dict[str, tuple[str, str]]  # target -> (lora_A key, lora_B key)
    dropped: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    mapping: list[tuple[str, str]]  # (source key, target key) for --dry-run
    tied: list[str]


def strip_wrappers(key: str) -> str:
    for wrapper in WRAPPERS:
        key = key.replace(wrapper, "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _peft_names(keys: list[str]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """peft names -> base names, and base weight -> (lora_A, lora_B) source keys."""
    renamed: dict[str, str] = {}
    pairs: dict[str, list[str | None]] = {}
    for key in keys:
        bare = key[len("adapter::"):] if key.startswith("adapter::") else key
        bare = strip_wrappers(bare)
        if bare.startswith("base_model.model."):
            bare = bare[len("base_model.model."):]
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", bare)
        if match:
            slot = pairs.setdefault(f"{match.group(1)}.weight", [None, None])
            slot[0 if match.group(2) == "A" else 1] = key
            continue
        if ".lora_" in bare or "lora_magnitude_vector" in bare:
            raise CheckpointError(f"adapter tensor {key} is not a LoRA A/B matrix (DoRA or embedding adapters are not merged)")
        bare = bare.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        renamed[key] = bare
    incomplete = [name for name, (a, b) in pairs.items() if a is None or b is None]
    if incomplete:
        raise CheckpointError(f"LoRA pair incomplete for {incomplete[0]} (lora_A or lora_B missing)")
    return renamed, {name: (a, b) for name, (a, b) in pairs.items()}  # type: ignore[misc]


def expected_model(model_dir: str | None, trust_remote_code: bool) -> tuple[Any, dict[str, Entry], dict[str, str]] | None:
    """(config, name -> Entry, tied alias -> the name it shares storage with) from a meta-device model."""
    if model_dir is None:
        return None
    from mathctl.convert_instella import expected_instella, is_instella_config

    if is_instella_config(model_dir):  # transformers has no Instella class: names and shapes from config.json
        config, shapes, tied = expected_instella(model_dir)
        return config, {name: Entry(name, shape, torch.float32) for name, shape in shapes.items()}, tied
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable config.json
        raise CheckpointError(f"cannot read the model config from {model_dir} ({type(exc).__name__})",
                              hint="give --base-model with a folder or hub id that has config.json") from None
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None  # e.g. a reward model's ...ForSequenceClassification
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_cls is not None and not getattr(config, "auto_map", None):
            model = model_cls(config)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    entries: dict[str, Entry] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied[name] = seen[id(param)]
            continue
        seen[id(param)] = name
        entries[name] = Entry(name, tuple(param.shape), param.dtype)
    for name, buf in model.named_buffers():
        persistent = name.rsplit(".", 1)[-1] not in getattr(_owner(model, name), "_non_persistent_buffers_set", set())
        if persistent:
            entries[name] = Entry(name, tuple(buf.shape), buf.dtype)
    return config, entries, tied


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
    return module


def make_plan(source: Source, expected: tuple[Any, dict[str, Entry], dict[str, str]] | None) -> Plan:
    keys = list(source.entries)
    if source.lora is not None or any(".lora_A." in k for k in keys):
        renamed, pairs = _peft_names(keys)
    else:
        renamed, pairs = {k: strip_wrappers(k) for k in keys}, {}
    dropped = [k for k, name in renamed.items() if DROPPABLE.search(name)]
    renamed = {k: name for k, name in renamed.items() if k not in dropped}
    names = set(renamed.values()) | set(pairs)
    exp = expected[1] if expected else None
    tied = expected[2] if expected else {}
    prefix_fix: Callable[[str], str] = lambda n: n  # noqa: E731
    if exp is not None:  # add or remove `model.`, whichever matches more of the expected names
        options: list[Callable[[str], str]] = [lambda n: n, lambda n: n[6:] if n.startswith("model.") else n,
                                               lambda n: "model." + n]
        known = set(exp) | set(tied)
        prefix_fix = max(options, key=lambda f: sum(f(n) in known for n in names))
    target_of = {k: prefix_fix(name) for k, name in renamed.items()}
    merges = {prefix_fix(name): ab for name, ab in pairs.items()}
    mapping = sorted(target_of.items())
    # tied aliases (lm_head.weight when it shares the embedding) are written once, under the kept name
    aliases = [k for k, t in target_of.items() if t in tied]
    for k in aliases:
        target_of.pop(k)
    sources: dict[str, list[str]] = {}
    for k, t in target_of.items():
        sources.setdefault(t, []).append(k)
    superseded = _pick_trained_copies(sources)
    duplicates = [t for t, ks in sources.items() if len(ks) > 1]
    if duplicates:
        raise CheckpointError(f"two source tensors map to {duplicates[0]} after removing wrapper prefixes",
                              hint="the state dict mixes wrapped and unwrapped copies; save one model's state dict")
    unknown_merge = [t for t in merges if t not in sources]
    if unknown_merge:
        raise CheckpointError(f"LoRA adapter targets {unknown_merge[0]}, which the base weights do not have",
                              hint="check --base-model: the adapter was trained on another model")
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    if exp is not None:
        missing = [n for n in exp if n not in sources]
        unexpected = sorted(t for t in sources if t not in exp)
        for t, ks in sources.items():
            if t in exp and source.entries[ks[0]].shape != exp[t].shape:
                mismatched.append(f"{t}: checkpoint {list(source.entries[ks[0]].shape)}, model {list(exp[t].shape)}")
        order = [n for n in exp if n in sources] + unexpected
    else:
        order = list(sources)
    targets = [Entry(t, source.entries[sources[t][0]].shape, source.entries[sources[t][0]].dtype) for t in order]
    return Plan(targets, sources, merges, dropped + superseded + aliases, missing, unexpected, mismatched, mapping,
                [f"{a} -> {b}" for a, b in tied.items()])


def _copy_rank(key: str) -> int:
    """How much a source tensor is the one to write when several map to one name (higher wins): peft's
    trained copy of a `modules_to_save` module (`...score.modules_to_save.default.weight`), then a full
    copy saved in an adapter folder (peft saves that trained copy under the plain name, `...score.weight`),
    then the base model's tensor, last peft's frozen original (`...score.original_module.weight`)."""
    if ".modules_to_save." in key:
        return 3
    if key.startswith("adapter::"):
        return 2
    if ".original_module." in key:
        return 0
    return 1


def _pick_trained_copies(sources: dict[str, list[str]]) -> list[str]:
    """Where several source tensors map to one target and one of them outranks the rest (`_copy_rank`:
    a LoRA run keeps a `modules_to_save` head, a reward model's `score`, both as trained and as original),
    keep that one; returns the others (dropped). Equal ranks are left for the caller's duplicate error."""
    superseded = []
    for target, keys in sources.items():
        if len(keys) < 2:
            continue
        best = max(_copy_rank(k) for k in keys)
        winners = [k for k in keys if _copy_rank(k) == best]
        if len(winners) == 1:
            superseded += [k for k in keys if k != winners[0]]
            sources[target] = winners
    return superseded


def check_plan(plan: Plan, allow_missing: bool) -> None:
    def listing(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    if plan.mismatched:
        raise CheckpointError(f"{len(plan.mismatched)} shape mismatches: {listing(plan.mismatched)}",
                              hint="the checkpoint belongs to another model size: check --base-model / the config")
    if plan.unexpected:
        raise CheckpointError(f"{len(plan.unexpected)} tensors the model does not have: {listing(plan.unexpected)}",
                              hint="check --base-model, or that SRC is this model's checkpoint")
    if plan.missing and not allow_missing:
        raise CheckpointError(f"{len(plan.missing)} tensors missing from the checkpoint: {listing(plan.missing)}",
                              hint="pass --allow-missing if that is deliberate (they are left out of the output)")


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
            from mathctl.convert_instella import is_instella_config

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
                from mathctl.convert_instella import write_olmo_side_files

                side = write_olmo_side_files(tmp, source.model_dir, olmo_dims, TOKENIZER_FILES)
            elif not single_file and expected is not None:  # config and tokenizer travel with the weights
                from mathctl.convert_instella import copy_remote_code

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
    from mathctl.convert_instella import dims_from_hf, olmo_layout, read_json_config

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
