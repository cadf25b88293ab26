"""Name mapping from a source to the target model: wrapper surgery, peft names, shape checks."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mathctl.convert.formats import DROPPABLE, WRAPPERS, Entry, Source
from mathctl.core.errors import CheckpointError

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
    from mathctl.convert.instella import expected_instella, is_instella_config

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
