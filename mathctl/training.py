"""Training plumbing shared by sft, rm, dpo and grpo: processes, sharding, optimiser, checkpoints, plots.

Sharding is ours, not accelerate's (ARCHITECTURE.md, Launch): `accelerate launch` starts the
processes; here each one joins the process group, wraps every decoder layer and then the root with
FSDP2 `fully_shard`, and saves/loads its shard of weights and optimiser state with
`torch.distributed.checkpoint` (DCP). One process skips the process group; the checkpoint format is
the same DCP layout, so a one-process run can be resumed or converted like a sharded one.

Checkpoint folder (`checkpoints/step_NNNNNN/`, renamed into place when complete):
    dcp/               model + optimiser state (DCP, one file per rank)
    trainer_state.json step, data position, scheduler state, metrics so far
    rng/rank_R.pt      torch / python / numpy RNG states per rank (loaded with weights_only=True)
    hf/                a Hugging Face folder of the weights (when output.save_hf_checkpoints)
    COMPLETE           marker written last
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mathctl.core.config import LaunchConfig, LoraSpec, ModelSpec, TrainBase
from mathctl.core.console import log
from mathctl.core.errors import CheckpointError, ConfigError
from mathctl.core.io import atomic_write_json
from mathctl.core.rundir import RunDir


# --- processes ------------------------------------------------------------------------------
@dataclass
class Dist:
    """Where this process stands: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def init_distributed(launch: LaunchConfig) -> Dist:
    """Join the process group when started by `accelerate launch`/torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = launch.backend if launch.backend != "auto" else ("nccl" if cuda else "gloo")
        torch.distributed.init_process_group(backend=backend, device_id=device if cuda else None)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def close_distributed(dist: Dist) -> None:
    if dist.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


# --- model preparation ----------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (the model's `_no_split_modules` classes)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    return layers


def apply_lora(model: torch.nn.Module, lora: LoraSpec, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, config)


def adapt_model(model: torch.nn.Module, train: TrainBase, lora: LoraSpec, device, task_type: str = "CAUSAL_LM"):
    """Gradient checkpointing and LoRA adapters as the recipe says, then the model on `device` (None: where
    it is; the steps shard it afterwards with `shard_model`)."""
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora.enabled:
        if train.gradient_checkpointing:
            model.enable_input_require_grads()
        with torch.random.fork_rng(devices=[]):
            model = apply_lora(model, lora, task_type=task_type)
            init_adapters(model, getattr(train, "seed", 0))  # every step's train section has a seed
    return model if device is None else model.to(device)


def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """(Re)initialise every LoRA adapter from `seed` alone, on CPU, as peft does (A: kaiming, B: zeros).

    On a meta-device base (prepare_model's sharded load) peft leaves the new adapters on the meta device,
    values lost; this gives them values, and the same ones a model loaded in full gets.
    """
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    init = model.peft_config["default"].init_lora_weights
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    for part in (module.lora_A[name], module.lora_B[name]):
                        if part.weight.is_meta:
                            part.to_empty(device="cpu")
                    module.reset_lora_parameters(name, init)


def shard_model(model: torch.nn.Module, launch: LaunchConfig, train: TrainBase, dist: Dist) -> torch.nn.Module:
    """FSDP2 per decoder layer + root (preset fsdp) or DDP (preset ddp); unchanged on one process."""
    if not dist.distributed:
        return model
    if launch.preset == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if train.precision == "bf16" \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=launch.reshard_after_forward)
    # The root's own weights (embeddings, final norm, LM or score head) stay gathered from forward to backward,
    # as FSDP2 does by default: resharded after forward, they are gathered again only by a backward that starts
    # from the model's outputs, and rm's loss starts from the head's output at chosen positions (a hook), so
    # its backward found the score head freed ("setStorage ... storage of size 0" on 2 processes).
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


# --- loading ----------------------------------------------------------------------------------
def prepare_model(build, spec: ModelSpec, train: TrainBase, lora: LoraSpec, launch: LaunchConfig, dist: Dist, *,
                  task_type: str = "CAUSAL_LM", frozen: bool = False) -> torch.nn.Module:
    """The step's model, loaded, adapted (gradient checkpointing, LoRA) and sharded.

    `build(empty)` returns the model before adaptation: loaded in full (`empty=False`), or with its
    parameters on the meta device (`empty=True`; buffers, and tensors the step makes itself such as a new
    score head, real). Several FSDP2 processes take the empty build: it is adapted and sharded, then
    materialised on the device, and each rank reads only its own rows of each weight from the safetensors
    files, so its peak host memory is near its shard rather than the whole model. One process, DDP, and a
    checkpoint that is not safetensors or whose names do not match the model, load in full on every rank.
    `frozen`: no adapters, no gradients, eval mode (a reference model); sharded only under FSDP2.
    """
    if dist.distributed and launch.preset == "fsdp":
        model = _load_sharded(build, spec, train, lora, launch, dist, task_type=task_type, frozen=frozen)
        if model is not None:
            return model
    model = build(False)
    if frozen:
        model = model.to(dist.device).eval().requires_grad_(False)
        return shard_model(model, launch, train, dist) if launch.preset == "fsdp" else model
    model = adapt_model(model, train, lora, dist.device, task_type=task_type)
    return shard_model(model, launch, train, dist)


def _load_sharded(build, spec: ModelSpec, train: TrainBase, lora: LoraSpec, launch: LaunchConfig, dist: Dist, *,
                  task_type: str, frozen: bool) -> torch.nn.Module | None:
    """prepare_model's sharded path; None (after one log line) when the checkpoint cannot be read by name."""
    from mathctl import models

    index, why = None, "not a safetensors checkpoint"
    try:
        index = models.safetensors_index(models.local_model_folder(spec))
    except Exception as exc:  # the full load below reports an unreachable hub properly
        why = f"no local folder ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if dist.all_reduce_sum([float(index is None)])[0]:  # every rank takes the same path (fully_shard is collective)
        log(f"{spec.path}: {why if index is None else 'not readable on every process'}; every process loads the "
            "whole model")
        return None
    model = build(True)
    if frozen:
        model.requires_grad_(False)
    else:
        model = adapt_model(model, train, lora, None, task_type=task_type)
    base_prefix = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "base_model_prefix", "")
    sources, captured, unmatched = {}, {}, []
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for names in aliases.values():  # tied weights: one Parameter under several names, one of them saved
        tensor = model.get_parameter(names[0])
        if tensor.device.type != "meta":  # made at build time (adapters, a new head): kept to copy from
            captured.update({n: tensor.detach().clone() for n in names})
            continue
        key = next((k for k in (_checkpoint_key(n, index, base_prefix) for n in names) if k is not None), None)
        if key is None:
            unmatched.append(names[0])
        sources.update({n: key for n in names})
    if unmatched:
        log(f"{spec.path}: {len(unmatched)} weight(s) not found by name in its safetensors files (e.g. "
            f"{unmatched[0]}); every process loads the whole model")
        return None
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}  # real (include_buffers=False)
    model = shard_model(model, launch, train, dist)
    model.to_empty(device=dist.device)
    _fill_shards(model, index, sources, {**captured, **buffers})
    return model.eval() if frozen else model


def _checkpoint_key(name: str, index: dict[str, Path], base_prefix: str) -> str | None:
    """The checkpoint name of parameter `name` (peft's wrappers and prefixes removed), if the checkpoint has it."""
    plain = name.removeprefix("base_model.model.")
    for wrapper in (".base_layer.", ".modules_to_save.default.", ".original_module."):
        plain = plain.replace(wrapper, ".")
    candidates = [plain]
    if base_prefix:  # a checkpoint of the bare backbone, or a backbone reading a full model's checkpoint
        candidates.append(plain.removeprefix(f"{base_prefix}.") if plain.startswith(f"{base_prefix}.")
                          else f"{base_prefix}.{plain}")
    return next((key for key in candidates if key in index), None)


def _fill_shards(model: torch.nn.Module, index: dict[str, Path], sources: dict[str, str],
                 values: dict[str, torch.Tensor]) -> None:
    """Copy into every local shard its rows: from `values` (full tensors by name) or read from the file.

    Reads go `_READ_BLOCK` bytes of rows at a time, each opening its file anew: safetensors maps the file, and
    the pages a read touches count in the process's resident memory until the map is closed, so a rank's peak
    is its shard plus about two blocks, not plus its part of the largest tensor (or of the whole checkpoint,
    were the files held open).
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def read(name: str, where: tuple[slice, ...]) -> torch.Tensor:
        if name in values:
            return values[name][where]
        key = sources[name]
        with safe_open(str(index[key]), framework="pt") as f:
            return f.get_slice(key)[where] if where else f.get_tensor(key)

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if isinstance(tensor, DTensor):
                local = tensor.to_local()
                shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            else:
                local, shape, offset = tensor, tuple(tensor.shape), (0,) * tensor.dim()
            if local.numel() == 0:  # more ranks than rows
                continue
            if local.dim() == 0:
                local.copy_(read(name, ()))
                continue
            rows = max(1, _READ_BLOCK // (local[0].numel() * local.element_size()))
            for first in range(0, shape[0], rows):
                last = min(first + rows, shape[0])
                where = (slice(offset[0] + first, offset[0] + last),
                         *(slice(start, start + size) for start, size in zip(offset[1:], shape[1:])))
                block = local[first:last]
                block.copy_(read(name, where).reshape(block.shape))  # copy_ casts (a bf16 checkpoint, fp32 params)


_READ_BLOCK = 16 << 20  # bytes of a shard filled per read


@contextmanager
def grad_sync(model: torch.nn.Module, train: TrainBase, last: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: reduce gradients across processes only on the last
    micro-batch of an optimiser step (train.grad_sync=last): FSDP2's set_requires_gradient_sync, DDP's
    no_sync. One process, or grad_sync=every: nothing changes."""
    sync = last or train.grad_sync == "every"
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    elif type(model).__name__ == "DistributedDataParallel" and not sync:
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(train: TrainBase, dist: Dist, model: torch.nn.Module):
    """bf16 autocast on one process (FSDP2 casts parameters itself through its policy)."""
    sharded = type(model).__name__.startswith("FSDP")  # fully_shard renames the class FSDP<Name>
    enabled = train.precision == "bf16" and not sharded
    return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=enabled)


# --- optimiser and schedule -----------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, train: TrainBase) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 or train.decay_norms_and_biases else no_decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # the fused kernel (CPU and CUDA) updates all parameters in one pass; same math as the loop
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
                for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps, fused=fused or None)


def lr_factor(step: int, total: int, train: TrainBase) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based) of `total`."""
    warmup = train.warmup_steps or int(train.warmup_ratio * total)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train.lr_schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = train.min_lr_ratio
    if train.lr_schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainBase, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, train))


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# --- state dicts and Hugging Face folders ---------------------------------------------------
def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (gathered from every rank; complete on rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def save_hf(model: torch.nn.Module, tokenizer: Any, out_dir: Path, dist: Dist, *, lora: LoraSpec | None = None,
            chat_template: str | None = None) -> None:
    """Write `out_dir` as a Hugging Face folder on rank 0 (every rank must call: gathering is collective).

    With LoRA the folder holds the merged model and `adapter/` the adapter alone.
    """
    state = full_model_state_dict(model)
    if not dist.is_main:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = unwrap(model)
    if lora is not None and lora.enabled:
        _save_merged_lora(inner, state, out_dir)
    else:
        inner.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        if chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out_dir)


def _save_merged_lora(peft_model: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Rebuild base + adapter on CPU from the gathered state, save the adapter, merge, save the model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_config = peft_model.base_model.model.config
    peft_config = peft_model.peft_config["default"]
    model_cls = type(peft_model.base_model.model)  # a causal LM, or a sequence classifier (reward models)
    with torch.device("cpu"):
        base = model_cls(base_config).to(torch.float32) if model_cls.__module__.startswith("transformers") \
            else AutoModelForCausalLM.from_config(base_config, dtype=torch.float32)
    clone = get_peft_model(base, peft_config)
    missing, unexpected = clone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise CheckpointError(f"LoRA state does not match its model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    clone.save_pretrained(out_dir / "adapter")
    merged = clone.merge_and_unload()
    merged.save_pretrained(out_dir)


# --- checkpoints ----------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_listify(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    return state


def _listify(obj: Any) -> Any:
    return [_listify(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tupleify(obj: Any) -> Any:
    return tuple(_tupleify(x) for x in obj) if isinstance(obj, list) else obj


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tupleify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def save_checkpoint(run_dir: RunDir, step: int, *, model, optimizer, scheduler, trainer_state: dict[str, Any],
                    dist: Dist, keep_last: int | None, hf: bool, tokenizer=None, lora: LoraSpec | None = None,
                    chat_template: str | None = None) -> Path:
    """Write checkpoint `step` atomically (every rank calls; rank 0 renames it into place)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = run_dir.checkpoints_dir / f".tmp_step_{step:06d}"
    if dist.is_main:
        tmp = run_dir.begin_checkpoint(step)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    with warnings.catch_warnings():  # one process saves without a process group, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.rank}.pt")
    if hf:
        save_hf(model, tokenizer, tmp / "hf", dist, lora=lora, chat_template=chat_template)
    dist.barrier()
    final = tmp
    if dist.is_main:
        state = dict(trainer_state, step=step, scheduler=scheduler.state_dict(), world_size=dist.world)
        atomic_write_json(tmp / "trainer_state.json", state)
        final = run_dir.commit_checkpoint(tmp, step, keep_last)
    dist.barrier()
    return final


def check_resume(path: Path, dist: Dist, plan: dict[str, int], *, hint: str) -> dict[str, Any] | None:
    """Before loading checkpoint `path`: a run resumes (on any number of processes) only when what fixes its
    data order and schedule (`plan`, saved in trainer_state.json: rows, global batch, total steps...) is
    unchanged, since every step then covers the same samples; returns the change of processes, for meta.json
    (None: the same number). Otherwise a ConfigError (exit 2) naming what would move, with `hint`."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved_world = state.get("world_size", 1)
    saved = {key: state.get(key) for key in plan}
    recorded = all(value is not None for value in saved.values())  # older checkpoints lack them
    if (recorded and saved != plan) or (not recorded and saved_world != dist.world):
        moved = ", ".join(f"{key} {saved[key] if saved[key] is not None else '(not recorded)'} -> {value}"
                          for key, value in plan.items() if saved[key] != value)
        raise ConfigError(f"{path.name} was written by {saved_world} process(es); resumed on {dist.world}, this run's "
                          f"{moved}: the data order and the schedule would change",
                          hint=hint.format(**{k: v if v is not None else "?" for k, v in saved.items()}, world=saved_world))
    if saved_world == dist.world:
        return None
    log(f"resuming a {saved_world}-process checkpoint on {dist.world} processes: same "
        + ", ".join(f"{key} ({value})" for key, value in plan.items()))
    return {"from_processes": saved_world, "to_processes": dist.world, "step": state.get("step"), **plan}


def load_checkpoint(path: Path, *, model, optimizer, scheduler, dist: Dist) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this rank's RNG from a complete checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != dist.world:
        log("DCP reshards the weights and optimiser state; RNG states come from matching ranks where they exist")
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=str(path / "dcp"))
    except Exception as exc:  # DCP raises a CheckpointException wrapping per-rank errors
        raise CheckpointError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}",
                              hint="the checkpoint does not match this model or recipe; resume with the recipe that wrote it") from None
    set_state_dict(unwrap(model), optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def held_out_share(items: list, dist: Dist, micro_batch_size: int) -> list[tuple[list, list[float]]]:
    """This rank's share of a held-out list as (micro-batch, weights) pairs, with the same number of
    micro-batches on every rank: FSDP's collectives hang unless every rank runs every forward. Rank r takes
    items r::world, padded to ceil(len / world) with copies of the first item weighted 0."""
    mine = items[dist.rank::dist.world]
    per_rank = -(-len(items) // dist.world)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [items[0]] * (per_rank - len(mine))
    return [(mine[i:i + micro_batch_size], weights[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


# --- data order -----------------------------------------------------------------------------
class StepPlan:
    """Which examples each process uses in each micro-batch of each optimiser step.

    The order is a seeded permutation per epoch, so the position in the data is a pure function of
    the step number: resuming at step s needs nothing but s. A step's global batch is
    `micro_batch_size * grad_accum_steps * world` samples; micro-batch j of rank r takes the slice
    [(j * world + r) * mbs, ...) of it, so a 2-process run with grad_accum_steps k sees the same
    samples per step as a 1-process run with 2k.
    """

    def __init__(self, num_examples: int, train: TrainBase, world: int, seed: int):
        self.n, self.mbs, self.accum, self.world, self.seed = num_examples, train.micro_batch_size, train.grad_accum_steps, world, seed
        self.global_batch = self.mbs * self.accum * world
        if num_examples < self.global_batch:
            raise ConfigError(
                f"the training data has {num_examples} rows, fewer than one optimiser step needs ({self.global_batch} = "
                f"micro_batch_size {self.mbs} x grad_accum_steps {self.accum} x {world} processes)",
                hint="add data or lower train.micro_batch_size / train.grad_accum_steps",
            )
        self.steps_per_epoch = num_examples // self.global_batch
        self.total_steps = train.max_steps or max(1, int(train.epochs * self.steps_per_epoch))
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            import random

            order = list(range(self.n))
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def step_indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._order(epoch)[start:start + self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        indices = self.step_indices(step)
        return [indices[(j * self.world + rank) * self.mbs:(j * self.world + rank + 1) * self.mbs] for j in range(self.accum)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def facts(self) -> dict[str, int]:
        """What fixes the data order and the schedule (saved in checkpoints; see check_resume)."""
        return {"examples": self.n, "global_batch": self.global_batch, "total_steps": self.total_steps}

    def resume_hint(self) -> str:
        return ("resume on {world} process(es), or keep the global batch of {global_batch} rows: micro_batch_size "
                f"({self.mbs}) x grad_accum_steps x processes ({self.world}) must equal it")



# --- plots ----------------------------------------------------------------------------------
def plot_curves(records: list[dict[str, Any]], series: list[tuple[str, str]], out_path: Path, title: str,
                ylabel: str = "loss") -> Path | None:
    """Line plot of `series` [(metric key, label)] against `step`; skips metrics never logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values: list[float] = []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in series:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
            values += ys
    if not values:
        plt.close(fig)
        return None
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")  # an early drop would flatten the rest of the curve
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
