"""verl / SkyRL FSDP actor checkpoints (`convert-ckpt --from verl`).

verl's FSDP checkpoint manager (and SkyRL's, which copies it) writes, per training step, an actor folder
(SkyRL calls it `policy/`; older SkyRL versions write neither fsdp_config.json nor huggingface/):

    global_step_N/actor/
      model_world_size_W_rank_R.pt    one per rank: torch.save(model.state_dict()) under a sharded state dict
      optim_world_size_W_rank_R.pt, extra_state_world_size_W_rank_R.pt   (not read here)
      fsdp_config.json                {"FSDP_version": 1 or 2, "world_size": W}
      huggingface/                    config.json, generation config, tokenizer (rank 0)
      lora_adapter/                   adapter_config.json (+ adapter_model.safetensors) when LoRA was trained

Each rank's state dict holds DTensors: its local shard plus the placements over a device mesh (1-D for
FSDP, 2-D `(ddp, fsdp)` for HSDP, where the first mesh dimension replicates). A one-GPU save may hold
plain tensors instead. With LoRA (peft) the names are peft's: `base_model.model.<name>.base_layer.weight`
beside `...lora_A.default.weight` / `...lora_B.default.weight`; verl's own merger writes the adapter
out separately (with `lora_alpha` 0); here it is merged into the base weights with the scale from
`lora_adapter/adapter_config.json` (alpha / r, or alpha / sqrt(r) with rsLoRA), as peft's
`merge_and_unload` does.

Loading never runs a full unpickle: `torch.load(weights_only=True)` with exactly the DTensor classes
allow-listed (`_SAFE_GLOBALS`), memory-mapped, in this one process with no process group (unpickling a
DTensor or DeviceMesh does not need one). Each tensor is rebuilt from the ranks' local shards by the
placements: the position of a rank's shard follows from its coordinates in the mesh saved with it, with
`torch.chunk` sizes (Shard(d) on a mesh dimension of size n splits dimension d into n chunks of
ceil(size/n) rows, the last ones shorter or empty), applied mesh dimension by mesh dimension. Every
local shape is checked against that arithmetic and the shards must cover the tensor exactly, so a
layout this reader does not understand stops with an error instead of writing shuffled weights.

Not covered: Partial placements, `_StridedShard` (FSDP combined with tensor parallelism), FSDP1
`ShardedTensor` state dicts (no device mesh), and verl's Megatron checkpoints (`dist_ckpt`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mathctl.core.errors import CheckpointError

RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def _safe_globals() -> list[Any]:
    """The classes the pickle of an FSDP/HSDP DTensor names (measured on torch 2.13 by recording the
    weights-only unpickler's allow-list lookups while loading real rank files), and nothing else.
    torch 2.13 registers these itself when `torch.distributed.tensor` is imported (and refuses DTensors
    until it is); naming them here keeps the load explicit and independent of that."""
    import torch.distributed.tensor  # noqa: F401 - registers DTensor's rebuild with the unpickler
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    allowed: list[Any] = [DTensor, DTensorSpec, TensorMeta, DeviceMesh, Shard, Replicate]
    try:  # newer torch: a mesh pickles its layout, a spec its shard order
        from torch.distributed._mesh_layout import _FlatLayout, _MeshLayout
        from torch.distributed.tensor._dtensor_spec import ShardOrderEntry

        allowed += [_MeshLayout, _FlatLayout, ShardOrderEntry]
    except ImportError:
        pass
    return allowed


def find_actor_folder(src: Path) -> Path | None:
    """SRC itself when it holds rank files, or the folder of them inside SRC = global_step_N: verl's
    `actor/`, SkyRL's `policy/`."""
    for folder in (src, src / "actor", src / "policy"):
        if folder.is_dir() and any(RANK_FILE.match(p.name) for p in folder.iterdir()):
            return folder
    return None


def _rank_files(folder: Path) -> tuple[int, list[Path]]:
    """(world size, files in rank order), refusing mixed world sizes and missing ranks."""
    found: dict[int, dict[int, Path]] = {}
    for path in folder.iterdir():
        match = RANK_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    if len(found) > 1:
        sizes = ", ".join(f"{w} ({len(r)} files)" for w, r in sorted(found.items()))
        raise CheckpointError(f"{folder} mixes model files of several world sizes: {sizes}",
                              hint="keep one checkpoint's model_world_size_W_rank_R.pt files per folder")
    world, ranks = next(iter(found.items()))
    config_path = folder / "fsdp_config.json"
    if config_path.is_file():
        try:
            saved = json.loads(config_path.read_text()).get("world_size")
        except (OSError, ValueError, AttributeError):
            raise CheckpointError(f"cannot read {config_path}", hint="it should hold {\"world_size\": W}") from None
        if saved is not None and saved != world:
            raise CheckpointError(f"{config_path} says world_size {saved}, but the model files are for world size "
                                  f"{world}", hint="the folder mixes two checkpoints; copy the matching files again")
    missing = [r for r in range(world) if r not in ranks]
    extra = sorted(r for r in ranks if r >= world)
    if missing or extra:
        names = ", ".join(f"model_world_size_{world}_rank_{r}.pt" for r in (missing or extra)[:3])
        problem = (f"is missing {len(missing)} of its {world} ranks ({names}"
                   + (" ..." if len(missing) > 3 else "") + ")") if missing else f"has ranks beyond {world - 1} ({names})"
        raise CheckpointError(f"{folder} {problem}", hint="every rank's model file is needed; copy the whole actor folder")
    return world, [ranks[r] for r in range(world)]


def _load_rank(path: Path) -> dict[str, Any]:
    import logging
    import warnings

    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_log.level
    try:
        # an unpickled DeviceMesh logs that no process group exists in this process: true and intended
        mesh_log.setLevel(logging.ERROR)
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler refuses a class, or a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot load {path.name} with weights_only=True ({first[:300]})",
                              hint="only tensors and DTensors (FSDP2, or FSDP1 with a device mesh) are read; "
                                   "an FSDP1 ShardedTensor checkpoint must be re-saved with a device mesh") from None
    finally:
        mesh_log.setLevel(level)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a state dict",
                              hint="is it a verl model_world_size_W_rank_R.pt file?")
    return state


def _chunk(start: int, length: int, parts: int, index: int) -> tuple[int, int]:
    """torch.chunk's piece `index` of [start, start+length): full pieces of ceil(length/parts), then
    whatever is left, then empty ones."""
    size = math.ceil(length / parts) if length else 0
    first = min(index * size, length)
    return start + first, max(0, min(size, length - first))


class _Piece:
    __slots__ = ("rank", "offsets", "sizes")

    def __init__(self, rank: int, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        self.rank, self.offsets, self.sizes = rank, offsets, sizes


def _pieces(key: str, values: list[Any], shape: tuple[int, ...]) -> list[_Piece]:
    """Where each rank's local shard sits in the full tensor (one piece per distinct region: replicas
    are read once)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], _Piece] = {}
    for rank, value in enumerate(values):
        if not isinstance(value, DTensor):
            region = ((0,) * len(shape), tuple(shape))
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"{key}: rank {rank} holds a plain tensor of shape {list(value.shape)}, rank 0 "
                                      f"one of {list(shape)}", hint="plain tensors are read as replicated copies; "
                                      "this checkpoint mixes layouts this reader does not know")
            seen.setdefault(region, _Piece(rank, *region))
            continue
        mesh = value.device_mesh.mesh
        where = (mesh == rank).nonzero()
        if where.shape[0] != 1:
            raise CheckpointError(f"{key}: rank {rank} is not in the device mesh saved with it ({mesh.tolist()})",
                                  hint="the rank files were renamed or mixed between runs")
        coords = where[0].tolist()
        offsets, sizes = [0] * len(shape), list(shape)
        for dim, placement in enumerate(value.placements):
            if type(placement) is Shard:
                axis = placement.dim % len(shape)
                offsets[axis], sizes[axis] = _chunk(offsets[axis], sizes[axis], mesh.shape[dim], coords[dim])
            elif type(placement) is not Replicate:
                raise CheckpointError(f"{key}: placement {placement} is not supported (only Shard and Replicate)",
                                      hint="FSDP with tensor parallelism or partial sums is not converted; "
                                           "use the training framework's own merger")
        local = tuple(value._local_tensor.shape)
        if local != tuple(sizes):
            raise CheckpointError(f"{key}: rank {rank}'s shard has shape {list(local)}; placements "
                                  f"{list(value.placements)} on mesh {list(mesh.shape)} give {sizes}",
                                  hint="this sharding layout is not understood; nothing was written")
        region = (tuple(offsets), tuple(sizes))
        seen.setdefault(region, _Piece(rank, *region))
    pieces = list(seen.values())
    if sum(math.prod(p.sizes) for p in pieces) != math.prod(shape):
        raise CheckpointError(f"{key}: the ranks' shards do not cover the tensor exactly (shape {list(shape)})",
                              hint="a rank file may come from another checkpoint")
    return pieces


@dataclass
class VerlCheckpoint:
    """What `convert` needs of an actor folder: full shapes and dtypes, and a reader of whole tensors."""

    folder: Path
    world_size: int
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    read: Callable[[list[str]], dict[str, torch.Tensor]]
    model_dir: str | None  # huggingface/ when it holds a config
    notes: list[str] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # {"scale", "fan_in_fan_out"} when peft LoRA tensors are present


def open_verl(src: Path) -> VerlCheckpoint:
    """Load a verl/SkyRL FSDP actor folder's rank files (memory-mapped) and work out where every shard
    goes; tensors are assembled only when read."""
    folder = find_actor_folder(src)
    if folder is None:
        raise CheckpointError(f"{src} holds no model_world_size_W_rank_R.pt files",
                              hint="point SRC at a verl checkpoint's actor folder (global_step_N/actor)")
    world, files = _rank_files(folder)
    states = [_load_rank(path) for path in files]
    first = states[0]
    names = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    for rank, state in enumerate(states[1:], 1):
        here = {k for k, v in state.items() if isinstance(v, torch.Tensor)}
        lacking = sorted(set(names) - here)
        extra = sorted(here - set(names))
        if lacking or extra:
            what = f"lacks {len(lacking)} tensors rank 0 has ({', '.join(lacking[:3])})" if lacking else \
                f"has {len(extra)} tensors rank 0 lacks ({', '.join(extra[:3])})"
            raise CheckpointError(f"{files[rank].name} {what}", hint="the rank files come from different checkpoints")
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    layout: dict[str, list[_Piece]] = {}
    kinds: set[str] = set()
    for key in names:
        values = [state[key] for state in states]
        shape = tuple(values[0].shape)  # a DTensor's shape is the full tensor's
        dtypes = {v.dtype for v in values}
        if len(dtypes) > 1:
            raise CheckpointError(f"{key}: the ranks disagree on its dtype ({sorted(map(str, dtypes))})",
                                  hint="the rank files come from different checkpoints")
        if any(tuple(v.shape) != shape for v in values):
            raise CheckpointError(f"{key}: the ranks disagree on its full shape",
                                  hint="the rank files come from different checkpoints")
        layout[key] = _pieces(key, values, shape)
        kinds.add(type(values[0]).__name__)
        tensors[key] = (shape, values[0].dtype)

    def local(rank: int, key: str) -> torch.Tensor:
        value = states[rank][key]
        return value._local_tensor if hasattr(value, "_local_tensor") else value

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            pieces = layout[key]
            if len(pieces) == 1:  # one GPU, or a replicated tensor: the stored tensor itself
                out[key] = local(pieces[0].rank, key)
                continue
            full = torch.empty(tensors[key][0], dtype=tensors[key][1])
            for piece in pieces:
                view = full
                for dim, (start, size) in enumerate(zip(piece.offsets, piece.sizes)):
                    view = view.narrow(dim, start, size)
                view.copy_(local(piece.rank, key))
            out[key] = full
        return out

    hf = folder / "huggingface"
    checkpoint = VerlCheckpoint(folder, world, tensors, read, str(hf) if (hf / "config.json").is_file() else None,
                                notes=[f"verl FSDP checkpoint {folder}: world size {world}, {_mesh_note(first, names)}, "
                                       f"{' and '.join(sorted(kinds))} values"])
    skipped = len(first) - len(names)
    if skipped:
        checkpoint.notes.append(f"{skipped} non-tensor entries ignored")
    if any(".lora_A." in k for k in names):
        checkpoint.lora = _lora_scale(folder, checkpoint.notes)
    return checkpoint


def _mesh_note(state: dict[str, Any], keys: list[str]) -> str:
    for key in keys:
        mesh = getattr(state[key], "device_mesh", None)
        if mesh is not None:
            names = mesh.mesh_dim_names
            return f"mesh {list(mesh.mesh.shape)}" + (f" {tuple(names)}" if names else "")
    return "no device mesh"


def _lora_scale(folder: Path, notes: list[str]) -> dict[str, Any]:
    """LoRA scale from verl's `lora_adapter/adapter_config.json` (peft's LoraConfig, saved by rank 0)."""
    path = folder / "lora_adapter" / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} holds LoRA tensors (lora_A/lora_B) but no lora_adapter/adapter_config.json, "
                              "so the LoRA alpha is unknown",
                              hint="write lora_adapter/adapter_config.json with the run's r and lora_alpha "
                                   "(actor_rollout_ref.model.lora_rank / lora_alpha)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"cannot read {path}", hint="it should be peft's adapter_config.json") from None
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: DoRA adapters are not merged", hint="merge it with peft's merge_and_unload()")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointError(f"{path} uses per-module ranks or alphas (rank_pattern/alpha_pattern), not handled here",
                              hint="merge it with peft's merge_and_unload()")
    if not config.get("r") or config.get("lora_alpha") is None:
        raise CheckpointError(f"{path} lacks r or lora_alpha", hint="write the run's lora_rank and lora_alpha into it")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if alpha == 0:  # verl's model_merger writes 0 as a placeholder it asks the user to fill in
        raise CheckpointError(f"{path} has lora_alpha 0, which would merge nothing",
                              hint="set lora_alpha to the run's actor_rollout_ref.model.lora_alpha")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    notes.append(f"LoRA r={r} alpha={alpha:g} scale={scale:g} merged into the base weights")
    return {"scale": scale, "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
