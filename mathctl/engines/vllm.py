"""The vLLM engine: a thin adapter over `vllm.LLM` (GPU only; `pip install 'mathctl[gpu]'`).

Prompts are tokenized here with the Hugging Face tokenizer and its resolved chat template (the same
text the hf engine feeds), then passed to vLLM as token ids, so both engines see identical inputs.
Each prompt gets its own `SamplingParams` whose seed is derived from (seed, prompt seed), which keeps
samples independent of batching, as in the hf engine (the streams themselves differ between engines).

`load_weights` pushes a full state dict into the colocated model (GRPO). vLLM's V1 engine runs the
model in a separate process unless `VLLM_ENABLE_V1_MULTIPROCESSING=0`; this adapter sets that before
creating the `LLM` so the model object is reachable in-process, and falls back to `collective_rpc`
when it is not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.core.errors import EngineError
from mathctl.engines import Prompt, Sample, encode_prompts, sample_seed


class VLLMEngine:
    backend = "vllm"

    def __init__(self, model_spec: ModelSpec, config: EngineConfig):
        import torch

        if not torch.cuda.is_available():
            raise EngineError("engine.backend=vllm needs a CUDA GPU and none is visible",
                              hint="set engine.backend=hf (or auto) on machines without a GPU")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from mathctl.models import load_tokenizer, resolve_model_path

        self.config = config
        self.tokenizer = load_tokenizer(model_spec, require_chat_template=False)
        self.chat_template = getattr(self.tokenizer, "chat_template", None) or None
        path = resolve_model_path(model_spec.path)
        tokenizer_path = resolve_model_path(model_spec.tokenizer) if model_spec.tokenizer else path
        self.llm = LLM(
            model=path, tokenizer=tokenizer_path, revision=model_spec.revision,
            trust_remote_code=model_spec.trust_remote_code, dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len, enable_prefix_caching=config.enable_prefix_caching,
            enforce_eager=config.enforce_eager, seed=0,
            logprobs_mode="processed_logprobs",  # the sampled distribution, as the hf engine reports (vLLM >= 0.10.2)
        )

    def _params(self, sampling: SamplingConfig, prompt_seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
            include_stop_str_in_output=sampling.include_stop_str,
            seed=None if sampling.seed is None else sample_seed(sampling.seed, prompt_seed, 0) % (2**31),
            logprobs=0 if sampling.logprobs else None, skip_special_tokens=False,
        )

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 prompt_seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        encoded = encode_prompts(self.tokenizer, prompts)
        seeds = list(prompt_seeds) if prompt_seeds is not None else list(range(len(prompts)))
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        params = [self._params(sampling, seed) for seed in seeds]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        results = []
        for output in outputs:
            samples = []
            for completion in output.outputs:
                logprobs = None
                if sampling.logprobs and completion.logprobs is not None:
                    logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
                samples.append(Sample(text=completion.text, token_ids=list(completion.token_ids),
                                      finish_reason=completion.finish_reason or "length",
                                      stop_reason=completion.stop_reason, logprobs=logprobs))
            results.append(samples)
        return results

    def load_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Load full tensors (names as in the Hugging Face model) into vLLM's model, then drop cached prefixes."""
        items = list(state_dict.items())
        model = self._local_model()
        if model is not None:
            model.load_weights(items)
        else:
            self.llm.collective_rpc(_load_into_worker, args=(items,))
        self.llm.reset_prefix_cache()

    def _local_model(self):
        try:
            worker = self.llm.llm_engine.model_executor.driver_worker
        except AttributeError:
            return None
        worker = getattr(worker, "worker", worker)
        runner = getattr(worker, "model_runner", None)
        return getattr(runner, "model", None)

    def close(self) -> None:
        import gc

        import torch

        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()


def _load_into_worker(worker, items):
    worker.model_runner.model.load_weights(items)
