"""Checkpoint sources: format detection and a reader per format (HF, DCP, FSDP runs, `.pt`, LoRA, verl, OLMo)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mathctl.convert.formats import _ST_DTYPES, DROPPABLE, FROM_FORMATS, TOKENIZER_FILES, Entry, Source
from mathctl.convert.gguf import _has_gguf_magic, _open_gguf
from mathctl.convert.plan import strip_wrappers
from mathctl.core.errors import CheckpointError, ConfigError


def detect_format(src: Path) -> str:
    from mathctl.convert.verl import find_actor_folder

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
    """A verl/SkyRL FSDP actor folder (see `verl.py`): whole tensors assembled from the ranks' shards."""
    from mathctl.convert.verl import open_verl

    checkpoint = open_verl(src)
    entries = {key: Entry(key, shape, dtype) for key, (shape, dtype) in checkpoint.tensors.items()}
    source = Source("verl", src, entries, checkpoint.read, model_dir=base_model or checkpoint.model_dir,
                    notes=checkpoint.notes)
    source.lora = checkpoint.lora  # peft names are renamed and merged by make_plan, as for a LoRA run
    return source


# Instella (OLMo-style) -------------------------------------------------------------------------


def _open_olmo(src: Path, base_model: str | None) -> Source:
    """Instella's unsharded checkpoint (folder with model.pt and config.yaml, or the .pt itself) seen
    under Hugging Face Instella names (see `instella.py`); a config.json made from config.yaml is
    staged in a temporary folder with any tokenizer files found beside model.pt."""
    import tempfile

    from mathctl.convert.instella import olmo_checkpoint_config

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
    from mathctl.convert.instella import plain_olmo_names, split_plan

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
    from mathctl.convert.instella import join_plan

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
