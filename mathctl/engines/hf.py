"""The transformers engine: batched generation with a KV cache, on CPU or GPU.

How a `generate` call runs:
1. Prompts are tokenized (chat messages through the chat template) and each prompt's `n` copies
   form units of at most `engine.batch_size` rows; units are sorted by prompt length (longest
   first, so a batch that does not fit in memory fails at once) and packed into batches.
2. Each batch is left-padded and prefilled once per distinct prompt; the KV cache rows are then
   repeated for the prompt's copies, so `n` samples cost one prefill.
3. Decoding feeds one token per row per step. Rows end at an EOS token, a stop string or their
   token budget; when a quarter of the rows have ended, the cache is compacted to the live rows.

Sampling: temperature, then top-k, then top-p, then inverse-CDF sampling with one uniform draw
per row. With `sampling.seed` set, every completion draws from its own stream seeded by (seed,
prompt seed, sample index), so it does not depend on batch size, order, or other prompts: a
resumed eval draws the same samples as an uninterrupted one. Log-probabilities are those of the
distribution each token was drawn from: after temperature, top-k and top-p (vLLM's
`processed_logprobs`); with top-k and top-p off this is what a trainer computes from `logits / T`.
Greedy decoding reports the log-probabilities of the unscaled distribution.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.core.errors import EngineError
from mathctl.engines import (
    Prompt,
    Sample,
    check_prompts,
    encode_prompts,
    eos_token_ids,
    finish_sample,
    sample_seed,
)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def pick_device(requested: str):
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError("engine.device=cuda but no CUDA GPU is visible", hint="set engine.device=cpu (or auto)")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def pick_dtype(requested: str, device):
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[requested])


class HFEngine:
    """`generate` and `load_weights` over a transformers causal LM."""

    backend = "hf"

    def __init__(self, model_spec: ModelSpec | None, config: EngineConfig | None = None, *,
                 model: Any = None, tokenizer: Any = None):
        """Load `model_spec`, or wrap an already loaded `model` and `tokenizer` (tests, benchmarks)."""
        from mathctl.models import load_causal_lm, load_tokenizer

        self.config = config or EngineConfig()
        self.device = pick_device(self.config.device)
        self.dtype = pick_dtype(self.config.dtype, self.device)
        if tokenizer is None:
            if model_spec is None:
                raise ValueError("HFEngine needs a model spec or a tokenizer")
            tokenizer = load_tokenizer(model_spec, require_chat_template=False)
        if model is None:
            if model_spec is None:
                raise ValueError("HFEngine needs a model spec or a model")
            model = load_causal_lm(model_spec, dtype=self.dtype, device_type=self.device.type)
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        self.model = model.to(self.device).eval()
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        if not self.eos_ids:
            raise EngineError("the model names no EOS token", hint="set eos_token_id in generation_config.json or the tokenizer")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.max_model_len = self.config.max_model_len or getattr(model.config, "max_position_embeddings", None) or 2**31
        params = inspect.signature(model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated there and
        # goes away in 5.40); older 5.x releases only know `past_key_values`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # --- public API ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 prompt_seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        encoded = encode_prompts(self.tokenizer, prompts)
        check_prompts(encoded, self.max_model_len)
        seeds = list(prompt_seeds) if prompt_seeds is not None else list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} prompt seeds")
        out: list[list[Sample | None]] = [[None] * sampling.n for _ in prompts]
        for batch in self._plan(encoded, sampling.n):
            rows = [(p, j) for p, start, count in batch for j in range(start, start + count)]
            for (p, j), sample in zip(rows, self._run_batch(batch, encoded, sampling, seeds)):
                out[p][j] = sample
        return out  # type: ignore[return-value]

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Copy full tensors (names as in `model.state_dict()`) into the model in place, one at a time
        as they come (a generator is never held whole)."""
        import torch

        own = self.model.state_dict()
        items = weights.items() if isinstance(weights, Mapping) else weights
        with torch.no_grad():
            for name, value in items:
                target = own.get(name)
                if target is None:
                    raise EngineError(f"pushed weight {name} is not in the engine's model",
                                      hint="push a state dict of the same architecture, names as in model.state_dict()")
                if tuple(value.shape) != tuple(target.shape):
                    raise EngineError(f"weight {name} has shape {tuple(value.shape)}, the engine's model {tuple(target.shape)}",
                                      hint="push weights of the same model (gather FSDP shards to full tensors first)")
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def sleep(self) -> None:
        """Nothing to release: the model's memory is its weights, which the next push overwrites."""

    def close(self) -> None:
        import torch

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- planning -----------------------------------------------------------------------------
    def _plan(self, encoded: list[list[int]], n: int) -> list[list[tuple[int, int, int]]]:
        """Batches of units (prompt, first sample, count), longest prompts first."""
        size = self.config.batch_size
        units = [(p, start, min(size, n - start)) for p in range(len(encoded)) for start in range(0, n, size)]
        units.sort(key=lambda u: -len(encoded[u[0]]))  # stable: equal lengths keep prompt order
        batches: list[list[tuple[int, int, int]]] = []
        rows = 0
        for unit in units:
            if not batches or rows + unit[2] > size:
                batches.append([])
                rows = 0
            batches[-1].append(unit)
            rows += unit[2]
        return batches

    # --- decoding -----------------------------------------------------------------------------
    def _run_batch(self, batch: list[tuple[int, int, int]], encoded: list[list[int]], sampling: SamplingConfig,
                   seeds: list[int]) -> list[Sample]:
        import torch
        from transformers import DynamicCache

        dev = self.device
        prompts = [encoded[p] for p, _, _ in batch]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            mask[r, width - len(ids):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        rows = [(p, j) for p, start, count in batch for j in range(start, start + count)]
        limits = [min(sampling.max_new_tokens, self.max_model_len - len(encoded[p])) for p, _ in rows]
        seeded = sampling.temperature > 0 and sampling.seed is not None
        rngs = [random.Random(sample_seed(sampling.seed, seeds[p], j)) for p, j in rows] if seeded else None
        stops = [s for s in sampling.stop if s]
        window = max((len(s) for s in stops), default=0) + 4

        generated: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] | None = [[] for _ in rows] if sampling.logprobs else None
        ended = [False] * len(rows)  # why a row ended is read off its tokens afterwards (finish_sample)

        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self._forward(input_ids, mask, positions, cache, prefill=True)
            repeats = torch.tensor([count for _, _, count in batch], device=dev)
            if int(repeats.max()) > 1:  # one prefill per prompt, then a cache row per sample
                select = torch.repeat_interleave(torch.arange(len(batch), device=dev), repeats)
                cache.batch_select_indices(select)
                logits, mask = logits[select], mask[select]
            lengths = mask.sum(-1)
            live = list(range(len(rows)))  # batch position -> row
            done_in_batch = 0
            while True:
                tokens, token_lp = self._pick(logits, sampling, [rngs[r] for r in live] if rngs else None)
                token_list = tokens.tolist()
                lp_list = token_lp.tolist() if token_lp is not None else None
                keep = []
                for pos, r in enumerate(live):
                    if ended[r]:
                        continue
                    tok = token_list[pos]
                    generated[r].append(tok)
                    if logprobs is not None:
                        logprobs[r].append(lp_list[pos])
                    if tok in self.eos_ids or len(generated[r]) >= limits[r] or \
                            (stops and self._stop_hit(generated[r], stops, window)):
                        ended[r] = True
                        done_in_batch += 1
                    else:
                        keep.append(pos)
                if not keep:
                    break
                if done_in_batch and done_in_batch >= max(1, len(live) // 4):
                    index = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(index)
                    mask, lengths, tokens = mask[index], lengths[index], tokens[index]
                    live = [live[k] for k in keep]
                    done_in_batch = 0
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                logits = self._forward(tokens[:, None], mask, lengths[:, None], cache, prefill=False)
                lengths = lengths + 1
        return [finish_sample(self._decode, generated[r], self.eos_ids, stops=stops,
                              include_stop_str=sampling.include_stop_str,
                              logprobs=logprobs[r] if logprobs is not None else None) for r in range(len(rows))]

    def _forward(self, input_ids, mask, positions, cache, *, prefill: bool):
        kwargs = {"logits_to_keep": 1} if (prefill and self._keep_arg) else {}
        kwargs[self._cache_arg] = cache
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()

    @staticmethod
    def _pick(logits, sampling: SamplingConfig, rngs: list[random.Random] | None):
        """Next token per row and, if asked, its log-probability."""
        import torch

        if sampling.temperature == 0:
            tokens = logits.argmax(dim=-1)
            lp = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0] if sampling.logprobs else None
            return tokens, lp
        scaled = logits / sampling.temperature
        filtered = scaled
        vocab = scaled.shape[-1]
        if sampling.top_k is not None and sampling.top_k < vocab:
            kth = torch.topk(filtered, sampling.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        order = None
        if sampling.top_p < 1.0:
            filtered, order = torch.sort(filtered, dim=-1, descending=True)
            probs = torch.softmax(filtered, -1)
            before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
            filtered = filtered.masked_fill(before > sampling.top_p, float("-inf"))
        probs = torch.softmax(filtered, -1)
        if rngs is not None:
            u = torch.tensor([max(rng.random(), 1e-12) for rng in rngs], device=logits.device, dtype=probs.dtype)
        else:
            u = torch.rand(probs.shape[0], device=logits.device, dtype=probs.dtype).clamp_(min=1e-12)
        cdf = probs.cumsum(-1)
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)
        tokens = (order.gather(1, choice) if order is not None else choice)[:, 0]
        lp = torch.log_softmax(filtered, -1).gather(1, choice)[:, 0] if sampling.logprobs else None
        return tokens, lp

    def _stop_hit(self, ids: list[int], stops: list[str], window: int) -> bool:
        tail = self._decode(ids[-window:])
        return any(stop in tail for stop in stops)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
