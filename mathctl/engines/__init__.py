"""Inference engines behind one small interface.

    engine = make_engine(model_spec, engine_config)
    outputs = engine.generate(prompts, sampling)      # list (per prompt) of lists (n) of Sample
    engine.load_weights(state_dict)                   # push new weights (GRPO), in place

A prompt is a string (sent as is) or a list of chat messages (rendered with the model's chat
template, the one `model.chat_template` names). `hf` is real batched generation with a KV cache
and runs anywhere (tests, CPU); `vllm` is a thin adapter over `vllm.LLM`, imported only when used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.core.errors import EngineError

Message = Mapping[str, str]
Prompt = str | Sequence[Message]


@dataclass
class Sample:
    """One completion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stop_reason: str | int | None = None  # the stop string or EOS token id that ended it
    logprobs: list[float] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine(Protocol):
    backend: str
    tokenizer: Any
    chat_template: str | None

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 prompt_seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        """`sampling.n` samples per prompt. `prompt_seeds` (one per prompt) makes each prompt's samples
        independent of which other prompts share the call (default: the prompt's position)."""
        ...

    def load_weights(self, state_dict: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def resolve_backend(requested: str) -> str:
    """`auto` -> vllm when it imports and a GPU is present, else hf."""
    if requested != "auto":
        return requested
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def make_engine(model: ModelSpec, config: EngineConfig) -> Engine:
    """Build the engine `config.backend` names for `model`."""
    backend = resolve_backend(config.backend)
    if backend == "vllm":
        if not vllm_available():
            raise EngineError("engine.backend=vllm but vLLM is not installed",
                              hint="install it with pip install 'mathctl[gpu]' (needs a CUDA GPU), or set engine.backend=hf")
        from mathctl.engines.vllm import VLLMEngine

        return VLLMEngine(model, config)
    from mathctl.engines.hf import HFEngine

    return HFEngine(model, config)


def sample_seed(seed: int, prompt_seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a prompt, mixed so nearby inputs give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_seed * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E9F8C3A1B2C4E5) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


__all__ = ["Engine", "Prompt", "Sample", "make_engine", "resolve_backend", "sample_seed", "vllm_available"]


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: strings as they are (with the tokenizer's usual special tokens),
    message lists through the installed chat template with the assistant header appended."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]))
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(f"prompt {i} is a chat conversation but the tokenizer has no chat template",
                              hint="set model.chat_template (chatml, tulu, llama3, rstar, plain, a .jinja file), or send plain text")
        text = tokenizer.apply_chat_template([dict(m) for m in prompt], tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Token ids that end a completion: the generation config's EOS (int or list) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
