"""Per-GPU memory plan of a training step (sft, rm, dpo, grpo): what `--dry-run` prints under the recipe.

Arithmetic over the model's architecture and the recipe, so a run that cannot fit is caught before
a cluster job starts. The architecture comes from the model folder's config.json (`model.path` a
local folder, or a hub id already in the local hub cache), from the `tiny:PRESET` table, or from the
published config values of the hub models the shipped recipes name (`KNOWN_CONFIGS`); anything else
gives a plan that says the model is unknown. Nothing here imports torch, except to detect the GPU's
memory when `launch.gpu_memory_gb` is not set. GiB are 2**30 bytes (an 80 GB card has 80 of them).

Notation: P parameters, P_t trainable ones, N = launch.num_processes, S = N under FSDP2 (preset fsdp,
N > 1; it shards everything over the processes) and 1 with ddp or one process, c = bytes of the
compute dtype (bf16: 2, fp32: 4), T tokens in one micro-batch, L layers, V vocabulary. Per process:

  parameters   fp32 master weights 4P/S, plus the compute-dtype copy the forward uses: under FSDP2 the
               root module (embeddings, final norm, head) stays gathered and decoder layers are gathered
               two at a time (the current one and the prefetched next), or all of them from forward to
               backward with launch.reshard_after_forward=false; without FSDP2, bf16 autocast keeps a bf16
               copy of every trainable weight it casts (the input embedding is looked up in fp32)
  gradients    4 P_t / S; 4 P_t when FSDP2 keeps unsharded gradients between micro-batches
               (train.grad_sync=last and more than one micro-batch per optimiser step); DDP adds its
               gradient buckets, a second 4 P_t
  optimiser    AdamW's two fp32 moments, 8 P_t / S
  activations  T x per-token bytes of one micro-batch's forward, kept for backward. Per layer and token,
               with a memory-efficient attention kernel (sdpa, flash-attention) and no dropout:
                   c (2h + 2q + 2kv + 4i) + 2 (4 + r) h        [+ 3ch under autocast]
               h hidden size, q = heads x head_dim, kv = kv_heads x head_dim (GQA), i intermediate size,
               r bytes of the residual stream (bf16 under FSDP2's bf16 weights; fp32 under autocast or fp32):
               the inputs of q/k/v_proj and of o_proj, rotated q and k and v (what the kernel saves), the
               MLP input, gate and up outputs, silu(gate), down_proj's input, and for each of the two
               RMSNorms the fp32 copy of its input and its normalised output. Autocast (bf16 on one process
               or DDP) casts the shared input of q/k/v_proj and of gate/up_proj once per linear. This is
               Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", 34h
               bytes in 16-bit for a GPT layer without the attention-score term) redone for SwiGLU, GQA,
               RMSNorm and no dropout masks; tests/unit/test_memory_plan.py checks it against the tensors a
               transformers Qwen2 layer saves. Eager attention adds (4 + c) x heads x sequence length for
               the fp32 softmax and its cast. With gradient checkpointing: r x h per layer and token (each
               layer's input) plus one layer's activations, recomputed in backward. Outside the layers: the
               final norm and the head's input, (4 + r + c) h.
  logits       the LM head's fp32 buffers (logits, log-softmax, their gradient: 3 x 4 bytes x V) for
               train.logits_chunk_tokens positions at a time, all of them when it is null; positions are
               T for sft, micro_batch_size x max_completion_len for grpo, 2 x micro_batch_size x max_seq_len
               for dpo (the chosen and the rejected rows); rm's head has one output (0). dpo holds no reference
               model (its reference log-probs are cached, or the LoRA base with the adapters off)
  reference    grpo with grpo.beta > 0 and no LoRA: a frozen fp32 copy of the policy, sharded like it under FSDP2
               (4P / processes; its layers are gathered one at a time like the policy's), whole under DDP
               or on one process (4P)
  engine       grpo's colocated rollout engine. vLLM (backend vllm, or auto, which is vLLM on a GPU) takes
               engine.gpu_memory_utilization x the GPU's memory (or its weights plus engine.kv_cache_gb)
               and, in sleep mode (the default for colocated engines), gives it back while the trainer
               steps; the hf engine keeps a copy of the weights in engine.dtype and a KV cache for
               engine.batch_size rows while generating

`total` is the training peak: the trainer's parts plus what the engine keeps while the trainer steps.
GRPO also has a rollout phase: the trainer's resident state (master weights, optimiser, reference)
beside the awake engine. The plan fits when both are within the GPU's memory.

Not counted: the CUDA context and NCCL buffers (about 1 GiB), allocator fragmentation, the gradients of a
layer in flight during backward, LoRA's own small activations, the block-causal mask of packed sft
micro-batches when flash-attention is not installed, and what vLLM keeps asleep (CUDA graphs, its
allocator's pool). A total within 10% of the GPU's memory is a maybe, not a yes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
DEFAULT_GPU_GIB = 80.0
PLANNED_STEPS = ("sft", "rm", "dpo", "grpo")


# --- architecture ------------------------------------------------------------------------------


def _config(model_type: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
            tie: bool) -> dict[str, Any]:
    return {"model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "tie_word_embeddings": tie}


# The published config.json values of the dense hub models the shipped recipes name as model.path, so a
# plan needs no download. DeepSeek-Coder-V2-Instruct (recipes/mcts/rstar-math-round1.yaml) is a
# mixture-of-experts model, which this plan does not count.
_QWEN25_MATH_7B = _config("qwen2", 3584, 18944, 28, 28, 4, 152064, tie=False)
_R1_DISTILL_QWEN_1_5B = _config("qwen2", 1536, 8960, 28, 12, 2, 151936, tie=False)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-Math-7B": _QWEN25_MATH_7B,
    "Qwen/Qwen2.5-Math-7B-Instruct": _QWEN25_MATH_7B,
    "Qwen/Qwen2.5-3B-Instruct": _config("qwen2", 2048, 11008, 36, 16, 2, 151936, tie=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _R1_DISTILL_QWEN_1_5B,
    "agentica-org/DeepScaleR-1.5B-Preview": _R1_DISTILL_QWEN_1_5B,  # fine-tuned from the model above
    "meta-llama/Llama-3.1-8B": _config("llama", 4096, 14336, 32, 32, 8, 128256, tie=False),
    # Llama 3.1 8B with Tulu 3's added tokens (vocab 128264; allenai/Llama-3.1-Tulu-3-8B config.json)
    "allenai/Llama-3.1-Tulu-3-8B-SFT": _config("llama", 4096, 14336, 32, 32, 8, 128264, tie=False),
    # OLMo-style layers with RMSNorm on all query and key channels (the HF conversion of AMD's own config)
    "amd/Instella-3B-Instruct": _config("instella", 2560, 6912, 36, 32, 32, 50304, tie=False),
}
_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "instella")  # decoder layouts counted below
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class Architecture:
    """The shape of a dense decoder-only transformer, in config.json's terms."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int
    qkv_bias: bool = False      # Qwen2; Llama's attention_bias sets it together with o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm_size: int = 0       # weights of the q/k RMSNorms per layer (OLMo2, Instella, Qwen3)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        weights = sum(fan_in * fan_out for fan_in, fan_out in self.linears().values())
        biases = (self.qkv_bias * (self.q_size + 2 * self.kv_size) + self.o_bias * h
                  + self.mlp_bias * (2 * i + h))
        return weights + biases + 2 * h + self.qk_norm_size  # two RMSNorm weights

    def outer_parameters(self, head: str = "lm") -> int:
        """Embeddings, final norm and the head: "lm" (the LM head; none of its own when tied) or "score"
        (a reward model's one-output linear, no bias)."""
        embedding = self.vocab_size * self.hidden_size
        if head == "score":
            return embedding + 2 * self.hidden_size
        return embedding + self.hidden_size + (0 if self.tie_word_embeddings else embedding)

    def parameters(self, head: str = "lm") -> int:
        return self.num_hidden_layers * self.layer_parameters() + self.outer_parameters(head)


def architecture_from_config(config: dict[str, Any]) -> Architecture:
    """An Architecture from config.json's keys.

    Raises:
        ValueError: a layout this plan does not count (unknown model_type, mixture of experts).
        KeyError: a required key is missing.
    """
    model_type = config.get("model_type", "")
    if model_type not in _LAYOUTS:
        raise ValueError(f"model_type {model_type or '(none)'} is not a layout the plan counts ({', '.join(_LAYOUTS)})")
    if any(config.get(key) for key in _MOE_KEYS):
        raise ValueError("mixture-of-experts models are not counted")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    attention_bias = bool(config.get("attention_bias", False))
    qk_norm = {"olmo2": (heads + kv_heads) * head_dim, "instella": (heads + kv_heads) * head_dim,
               "qwen3": 2 * head_dim}.get(model_type, 0)
    return Architecture(
        model_type=model_type, hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=config["vocab_size"], tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=head_dim, qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2", mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm_size=qk_norm)


def _tiny_config(path: str) -> dict[str, Any]:
    """config.json values of a `tiny:PRESET` model without building it (vocab: the tokenizer's trained size)."""
    from mathctl.models import TINY_PRESETS, TINY_VOCAB

    preset = path[5:].partition("@")[0]
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset}")
    settings = dict(TINY_PRESETS[preset])
    settings["model_type"] = settings.pop("arch")
    settings["vocab_size"] = settings["vocab_size"] or TINY_VOCAB
    settings.setdefault("tie_word_embeddings", True)  # as build_tiny_model
    return settings


def _hub_cached_config(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found) if isinstance(found, str) else None


def read_architecture(spec: Any) -> tuple[Architecture | None, str]:
    """The architecture of `spec.path` (a ModelSpec) and where it was read, or None and why not."""
    from mathctl.core.errors import MathctlError
    from mathctl.models import resolve_model_path

    path = spec.path
    try:
        if path.startswith("tiny:"):
            return architecture_from_config(_tiny_config(path)), "tiny preset"
        local = Path(resolve_model_path(path))
        file = local / "config.json" if local.is_dir() else _hub_cached_config(path, spec.revision)
        if file is not None:
            if not file.is_file():
                return None, f"{local} has no config.json"
            return architecture_from_config(json.loads(file.read_text())), "config.json"
        if path in KNOWN_CONFIGS:
            return architecture_from_config(KNOWN_CONFIGS[path]), "published config"
        return None, f"{path} is not a local folder, not in the hub cache, and not one of the known models"
    except MathctlError as exc:
        return None, exc.message
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cannot read the architecture of {path}: {exc}"


def lora_parameters(arch: Architecture, lora: Any) -> tuple[int, list[str]]:
    """peft's A and B matrices, r x (in + out) per targeted linear of every decoder layer, and the
    target names that match no decoder linear (not counted)."""
    linears = arch.linears()
    groups = {name: "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
              for name in linears}
    targets = lora.target_modules
    unmatched: list[str] = []
    if targets == "all-linear":
        names = list(linears)
    elif isinstance(targets, str):  # peft: a regex matched against the full module name
        names = [n for n in linears if re.fullmatch(targets, f"model.layers.0.{groups[n]}.{n}")]
    else:  # peft: each entry matches a module name or a dotted suffix of it
        names = [n for n in linears if any(f".{groups[n]}.{n}".endswith(f".{t}") for t in targets)]
        unmatched = [t for t in targets if not any(f".{groups[n]}.{n}".endswith(f".{t}") for n in linears)]
    per_layer = sum(lora.r * (linears[n][0] + linears[n][1]) for n in names)
    return arch.num_hidden_layers * per_layer, unmatched


def residual_bytes(compute: int, autocast: bool) -> int:
    """Bytes per value of the residual stream: bf16 when FSDP2 casts the weights, fp32 under autocast or fp32."""
    return 2 if compute == 2 and not autocast else 4


def activation_bytes_per_token(arch: Architecture, compute: int, *, autocast: bool = False,
                               eager_seq_len: int | None = None) -> int:
    """Bytes one decoder layer keeps for backward per token (the formula in the module docstring)."""
    h, q, kv, i = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    per_token = compute * (2 * h + 2 * q + 2 * kv + 4 * i) + 2 * (4 + residual_bytes(compute, autocast)) * h
    if autocast:  # q/k/v_proj and gate/up_proj each cast their shared input: three more copies
        per_token += 3 * compute * h
    if eager_seq_len:
        per_token += (4 + compute) * arch.num_attention_heads * eager_seq_len
    return per_token


# --- the plan ----------------------------------------------------------------------------------


PARTS = ("parameters", "gradients", "optimiser", "activations", "logits", "reference", "engine")


@dataclass
class MemoryPlan:
    """Bytes per process of one step's recipe; `known` is False when the model's architecture is not."""

    model: str
    known: bool
    source: str                                    # where the architecture came from, or why it is unknown
    processes: int = 1
    sharded_over: int = 1
    gpu_bytes: float = 0.0
    gpu_source: str = ""
    parameters: int = 0                            # P, and the trainable ones P_t
    trainable: int = 0
    parts: dict[str, float] = field(default_factory=dict)
    gathered: float = 0.0                          # the compute-dtype copy inside parts["parameters"]
    tokens: int = 0                                # in one micro-batch, at most
    checkpointing: bool = False
    activations_other: float = 0.0                 # activations with checkpointing switched the other way
    engine_kept: float = 0.0                       # what the engine holds while the trainer steps
    rollouts: float = 0.0                          # grpo: resident trainer state + awake engine
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts[p] for p in PARTS if p != "engine") + self.engine_kept

    @property
    def peak(self) -> float:
        return max(self.total, self.rollouts)

    @property
    def fits(self) -> bool | None:
        return None if not self.known else self.peak <= self.gpu_bytes

    @property
    def tight(self) -> bool:
        """Fits, but within 10% of the GPU's memory, which the parts left out can fill."""
        return bool(self.fits) and self.peak > 0.9 * self.gpu_bytes

    def gpu_text(self) -> str:
        text = f"{gib(self.gpu_bytes):.4g} GiB"
        return f"{text} ({self.gpu_source})" if self.gpu_source != "launch.gpu_memory_gb" else text

    def lines(self) -> list[str]:
        """The `# ...` comment lines `--dry-run` prints after the recipe."""
        if not self.known:
            return [f"# memory per GPU: not planned, unknown architecture ({self.source})"]
        p = self.parts
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        layout = f"FSDP2 over {self.sharded_over}" if self.sharded_over > 1 else "unsharded"
        other = "without" if self.checkpointing else "with"
        lines = [
            f"# memory per GPU: {self.model} ({self.source}), {count(self.parameters)} parameters, "
            f"{count(self.trainable)} trainable; micro-batches of at most {self.tokens:,} tokens",
            f"# memory per GPU ({processes}, {layout}): parameters {size(p['parameters'])}, "
            f"gradients {size(p['gradients'])}, optimiser {size(p['optimiser'])}, activations "
            f"{size(p['activations'])} ({size(self.activations_other)} {other} checkpointing), logits "
            f"{size(p['logits'])}, reference {size(p['reference'])}, engine {size(p['engine'])}, total "
            f"{size(self.total)} of {self.gpu_text()}",
        ]
        if self.rollouts:
            lines.append(f"# memory per GPU during rollouts: master weights, optimiser and reference beside the "
                         f"awake engine, {size(self.rollouts)} of {self.gpu_text()}")
        lines += [f"# memory note: {note}" for note in self.notes]
        if self.tight:
            lines.append("# memory note: within 10% of the GPU's memory; the CUDA context, NCCL buffers and "
                         "fragmentation (not counted) may not fit beside it")
        if self.fits is False:
            lines.append(f"# warning: {self.warning()}")
        return lines

    def warning(self) -> str | None:
        """What does not fit and the first thing to change; None when it fits (or is unknown)."""
        if self.fits is not False:
            return None
        if self.rollouts > self.total:
            return (f"during GRPO rollouts the trainer's resident state plus the engine need {size(self.rollouts)} per "
                    f"GPU, more than its {self.gpu_text()}; lower engine.gpu_memory_utilization or use more processes")
        largest = max((p for p in PARTS if p != "engine"), key=lambda p: self.parts[p])
        hints = {
            "parameters": "use more processes (launch.num_processes) or LoRA (lora.enabled=true)",
            "gradients": "set train.grad_sync=every (sharded gradients), use more processes, or LoRA",
            "optimiser": "use more processes (launch.num_processes) or LoRA (lora.enabled=true)",
            "activations": ("lower train.micro_batch_size or the sequence length" if self.checkpointing
                            else "set train.gradient_checkpointing=true or lower train.micro_batch_size"),
            "logits": "set train.logits_chunk_tokens (e.g. 1024)",
            "reference": "use more processes under FSDP2 (it is sharded), LoRA (the reference is then the adapters "
                         "switched off) or grpo.beta=0",
        }
        return (f"the plan needs {size(self.total)} per GPU, more than its {self.gpu_text()}; the largest part is "
                f"{largest} ({size(self.parts[largest])}): {hints[largest]}")

    def summary(self) -> dict[str, Any]:
        """The `memory` field of `--dry-run --json`."""
        if not self.known:
            return {"known": False, "model": self.model, "reason": self.source, "fits": None}
        values = {**self.parts, "activations_" + ("without" if self.checkpointing else "with") + "_checkpointing":
                  self.activations_other, "total": self.total, "rollouts": self.rollouts}
        return {"known": True, "model": self.model, "architecture_from": self.source, "parameters": self.parameters,
                "trainable_parameters": self.trainable, "processes": self.processes, "sharded_over": self.sharded_over,
                "micro_batch_tokens": self.tokens, "gradient_checkpointing": self.checkpointing,
                "gpu_bytes": round(self.gpu_bytes),
                "gpu_gib": round(gib(self.gpu_bytes), 3), "gpu_memory_from": self.gpu_source,
                "bytes": {k: round(v) for k, v in values.items()},
                "gib": {k: round(gib(v), 3) for k, v in values.items()}, "fits": self.fits, "tight": self.tight,
                "notes": self.notes}


def gib(num_bytes: float) -> float:
    return num_bytes / GIB


def size(num_bytes: float) -> str:
    """`12.3 GiB`, or MiB below a tenth of a GiB (tiny models)."""
    if not num_bytes:
        return "0"
    if num_bytes < GIB / 10:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{gib(num_bytes):.1f} GiB"


def count(n: int) -> str:
    """`7.62B`, `854.3K`: a parameter count."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def gpu_memory(launch: Any) -> tuple[float, str]:
    """Bytes of one GPU and where the number came from: the recipe, the visible GPU, or assumed."""
    if launch.gpu_memory_gb is not None:
        return launch.gpu_memory_gb * GIB, "launch.gpu_memory_gb"
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), f"detected, {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return DEFAULT_GPU_GIB * GIB, "assumed"


def _micro_batches_per_step(step: str, cfg: Any) -> int:
    if step == "grpo":  # each process's completions of one mini-batch, micro_batch_size at a time
        g = cfg.grpo
        local = g.prompts_per_step // cfg.launch.num_processes * g.group_size // g.mini_batches
        return math.ceil(local / cfg.train.micro_batch_size)
    return cfg.train.grad_accum_steps


def _tokens(step: str, cfg: Any) -> tuple[int, int, int]:
    """(tokens in one micro-batch, sequence length, positions through the LM head), at most."""
    train = cfg.train
    if step == "grpo":
        seq = cfg.grpo.max_prompt_len + cfg.grpo.max_completion_len
        return train.micro_batch_size * seq, seq, train.micro_batch_size * cfg.grpo.max_completion_len
    if step == "rm":  # chosen and rejected texts go through one forward
        return 2 * train.micro_batch_size * train.max_seq_len, train.max_seq_len, 0
    if step == "dpo":  # chosen and rejected rows in one forward; their response positions go through the LM head
        rows = 2 * train.micro_batch_size
        return rows * train.max_seq_len, train.max_seq_len, rows * train.max_seq_len
    return train.micro_batch_size * train.max_seq_len, train.max_seq_len, train.micro_batch_size * train.max_seq_len


def plan_memory(step: str, cfg: Any) -> MemoryPlan | None:
    """The memory plan of a validated sft, rm, dpo or grpo config; None for other steps."""
    if step not in PLANNED_STEPS:
        return None
    arch, source = read_architecture(cfg.model)
    if arch is None:
        return MemoryPlan(model=cfg.model.path, known=False, source=source)
    train, lora, launch = cfg.train, cfg.lora, cfg.launch
    n = launch.num_processes
    fsdp = launch.preset == "fsdp" and n > 1
    shards = n if fsdp else 1
    compute = 2 if train.precision == "bf16" else 4
    head = "score" if step == "rm" else "lm"
    total_params = arch.parameters(head)
    notes: list[str] = []
    if lora.enabled:
        trainable, unmatched = lora_parameters(arch, lora)
        if head == "score":
            trainable += arch.hidden_size  # the score head trains in full beside the adapters
        if unmatched:
            notes.append(f"LoRA targets {', '.join(unmatched)} match no decoder linear and are not counted")
    else:
        trainable = total_params

    # parameters: fp32 master weights (sharded under FSDP2) and the copy the forward computes with
    layer = arch.layer_parameters()
    if fsdp:
        gathered_layers = 2 if launch.reshard_after_forward else arch.num_hidden_layers
        gathered = compute * (arch.outer_parameters(head) + gathered_layers * layer)
    elif compute == 2:  # autocast caches the bf16 casts of weights that require grad; frozen ones are cast per use
        embedding = arch.vocab_size * arch.hidden_size
        cast = total_params - (0 if head == "lm" and arch.tie_word_embeddings else embedding)
        gathered = 2 * (layer if lora.enabled else cast)
    else:
        gathered = 0
    parts = {"parameters": 4 * total_params / shards + gathered}

    micro_batches = _micro_batches_per_step(step, cfg)
    unsharded = fsdp and train.grad_sync == "last" and micro_batches > 1
    parts["gradients"] = 4 * trainable / (1 if unsharded else shards)
    if unsharded:
        notes.append(f"gradients unsharded: train.grad_sync=last with {micro_batches} micro-batches per optimiser "
                     "step keeps a full fp32 gradient per process; train.grad_sync=every shards it")
    if launch.preset == "ddp" and n > 1:
        parts["gradients"] += 4 * trainable  # DDP's gradient buckets
    parts["optimiser"] = 8 * trainable / shards

    tokens, seq_len, head_positions = _tokens(step, cfg)
    eager = cfg.model.attn_implementation == "eager"
    autocast = compute == 2 and not fsdp  # training.autocast: bf16 autocast unless FSDP2 casts the weights
    per_layer = activation_bytes_per_token(arch, compute, autocast=autocast, eager_seq_len=seq_len if eager else None)
    residual = residual_bytes(compute, autocast)
    outside = (4 + residual + compute) * arch.hidden_size  # the final norm and the head's input
    full = tokens * (arch.num_hidden_layers * per_layer + outside)
    checkpointed = tokens * (arch.num_hidden_layers * residual * arch.hidden_size + per_layer + outside)
    parts["activations"] = checkpointed if train.gradient_checkpointing else full
    chunk = getattr(train, "logits_chunk_tokens", None)
    live = head_positions if chunk is None else min(chunk, head_positions)
    parts["logits"] = 3 * 4 * live * arch.vocab_size

    grpo = step == "grpo"
    parts["reference"] = 4 * total_params / shards if grpo and cfg.grpo.beta > 0 and not lora.enabled else 0
    gpu_bytes, gpu_source = gpu_memory(launch)
    engine, engine_kept = _engine(cfg, arch, gpu_bytes, notes) if grpo else (0.0, 0.0)
    parts["engine"] = engine
    resident = 4 * total_params / shards + parts["optimiser"] + parts["reference"]
    return MemoryPlan(
        model=cfg.model.path, known=True, source=source, processes=n, sharded_over=shards, gpu_bytes=gpu_bytes,
        gpu_source=gpu_source, parameters=total_params, trainable=trainable, parts=parts, gathered=gathered,
        tokens=tokens, checkpointing=train.gradient_checkpointing,
        activations_other=full if train.gradient_checkpointing else checkpointed, engine_kept=engine_kept,
        rollouts=resident + engine if grpo else 0.0, notes=notes)


def _engine(cfg: Any, arch: Architecture, gpu_bytes: float, notes: list[str]) -> tuple[float, float]:
    """(bytes the rollout engine takes while generating, bytes it keeps while the trainer steps)."""
    engine = cfg.engine
    dtype = 4 if engine.dtype == "float32" else 2  # auto: bf16 on a GPU
    weights = dtype * arch.parameters()
    if engine.backend == "hf":
        g = cfg.grpo
        kv_cache = (engine.batch_size * (g.max_prompt_len + g.max_completion_len) * arch.num_hidden_layers
                    * 2 * arch.kv_size * dtype)
        notes.append("hf engine: its own copy of the weights stays on the GPU; its KV cache only while generating")
        return weights + kv_cache, weights
    if engine.kv_cache_gb is not None:
        taken = weights / engine.tensor_parallel_size + engine.kv_cache_gb * GIB
    else:
        taken = engine.gpu_memory_utilization * gpu_bytes
    asleep = engine.sleep_mode is not False  # null: on for colocated engines on CUDA
    notes.append("vLLM engine " + ("asleep while the trainer steps (sleep mode)" if asleep
                                   else "awake while the trainer steps (engine.sleep_mode=false)"))
    return taken, 0.0 if asleep else taken
