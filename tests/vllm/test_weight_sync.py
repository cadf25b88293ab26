"""Weights pushed into vLLM (GRPO's refresh after every step), and a real shutdown.

After a push the vLLM engine must answer exactly as the hf engine with the same weights, whether vLLM
runs in this process (colocated GRPO) or in a child process (vLLM's default), where the weights travel
in buckets of whole decoder layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.core.errors import EngineError
from mathctl.engines.hf import HFEngine

pytestmark = pytest.mark.vllm  # run in .venv-vllm by tests/vllm/run; not in the default run

PROMPTS = [f"What is {i} + {2 * i}? Tom has" for i in range(8)] + [[{"role": "user", "content": "Add 3 and 4."}]]
GREEDY = SamplingConfig(max_new_tokens=16, logprobs=True)


def _same(got, want):
    for a, b in zip(got, want):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)


def test_pushed_weights_give_the_hf_engines_answers(vllm_model, vllm_base_model):
    from transformers import AutoModelForCausalLM

    from mathctl.engines.vllm import VLLMEngine

    engine = VLLMEngine(ModelSpec(path=str(vllm_model)), EngineConfig(backend="vllm", max_model_len=128))
    try:
        before = engine.generate(PROMPTS, GREEDY)
        target = AutoModelForCausalLM.from_pretrained(vllm_base_model)
        seen = []

        def stream():  # a generator, as GRPO pushes: the engine pulls one tensor at a time
            for name, value in target.state_dict().items():
                seen.append(name)
                yield name, value

        engine.load_weights(stream())
        assert len(seen) == len(target.state_dict())
        after = engine.generate(PROMPTS, GREEDY)
        _same(after, HFEngine(ModelSpec(path=str(vllm_base_model)), EngineConfig()).generate(PROMPTS, GREEDY))
        assert [s[0].token_ids for s in after] != [s[0].token_ids for s in before]

        with pytest.raises(EngineError, match="not in the engine's model"):
            engine.load_weights({"model.layers.0.no_such.weight": torch.zeros(2)})
        name, value = next(iter(target.state_dict().items()))
        with pytest.raises(EngineError, match="did not take the pushed weights"):
            engine.load_weights({name: torch.zeros(value.shape[0] + 1, *value.shape[1:])})
    finally:
        engine.close()


_CHILD = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM
    from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
    from mathctl.engines.vllm import VLLMEngine

    def main():
        model, base = sys.argv[1], sys.argv[2]
        engine = VLLMEngine(ModelSpec(path=model), EngineConfig(backend="vllm", max_model_len=128,
                                                                weight_sync_bucket_mb=0.05))
        engine.load_weights(AutoModelForCausalLM.from_pretrained(base).state_dict())
        prompts = [f"What is {i} + {2 * i}? Tom has" for i in range(8)]
        out = engine.generate(prompts, SamplingConfig(max_new_tokens=16, logprobs=True))
        print("RESULT", json.dumps({"in_process": engine.in_process,
                          "samples": [[s[0].token_ids, s[0].logprobs] for s in out]}))
        engine.close()

    if __name__ == "__main__":
        main()
""")


def test_push_into_a_multiprocess_engine(vllm_model, vllm_base_model, tmp_path):
    """vLLM's default (engine core in a child process), weights in buckets of 50 kB: several buckets,
    each holding whole decoder layers (the tiny model's layer is ~0.6 MB, its embedding ~0.3 MB)."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run([sys.executable, str(script), str(vllm_model), str(vllm_base_model)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]  # vLLM logs to stdout too
    result = json.loads(line[len("RESULT "):])
    assert result["in_process"] is False
    want = HFEngine(ModelSpec(path=str(vllm_base_model)), EngineConfig()).generate(PROMPTS[:8], GREEDY)
    for (ids, logprobs), b in zip(result["samples"], want):
        assert ids == b[0].token_ids and logprobs == pytest.approx(b[0].logprobs, abs=1e-4)


def test_layer_buckets_never_split_a_layer():
    from mathctl.engines.vllm import _layer_buckets

    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(3) for p in ("q.weight", "k.weight")] \
        + ["model.norm.weight"]
    stream = [(n, torch.zeros(10)) for n in names]  # 40 bytes each
    buckets = [[n for n, _ in b] for b in _layer_buckets(iter(stream), 50)]
    assert sum(buckets, []) == names
    for bucket in buckets:
        layers = {n.split(".")[2] for n in bucket if ".layers." in n}
        for layer in layers:  # a layer in this bucket has all its tensors here
            assert {f"model.layers.{layer}.q.weight", f"model.layers.{layer}.k.weight"} <= set(bucket)
    assert len(buckets) >= 4


def test_close_shuts_vllm_down_for_real(vllm_model):
    """Build, close, build again in one process (what `--rounds` and `pipeline` do between stages);
    after close no process group is left, so a trainer can create its own."""
    import torch.distributed as dist

    from mathctl.engines.vllm import VLLMEngine

    prompts = PROMPTS[:3]
    first = VLLMEngine(ModelSpec(path=str(vllm_model)), EngineConfig(backend="vllm", max_model_len=128))
    a = first.generate(prompts, GREEDY)
    first.close()
    first.close()  # twice is harmless
    assert first.llm is None and not dist.is_initialized()
    second = VLLMEngine(ModelSpec(path=str(vllm_model)), EngineConfig(backend="vllm", max_model_len=128))
    try:
        _same(second.generate(prompts, GREEDY), a)
    finally:
        second.close()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        tensor = torch.ones(2)
        dist.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


def _port() -> int:
    from mathctl.core.launch import free_port

    return free_port()
