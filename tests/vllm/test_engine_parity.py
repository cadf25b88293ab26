"""The vLLM engine against the hf engine on the same model folder, fp32, CPU: one rule for both.

Greedy token ids must be identical (fp32 on both sides; the CPU kernels differ only in rounding, and
the random model's logits are not near-ties), log-probabilities must match a teacher-forced forward
pass, and text, finish and stop reasons must come out the same for stop strings and EOS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import teacher_forced_logprobs

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.core.errors import EngineError
from mathctl.engines import encode_prompts, resolve_backend
from mathctl.engines.hf import HFEngine

pytestmark = pytest.mark.vllm  # run in .venv-vllm by tests/vllm/run; not in the default run

# 16 raw prompts of varied lengths and 4 chat conversations
PROMPTS = [f"Tom has {i} apples and buys {3 * i + 1} more. How many?" + " Think." * (i % 4) for i in range(16)] + [
    [{"role": "user", "content": f"What is {i} + {i * 7}?"}] for i in range(4)
]


@pytest.fixture(scope="module")
def engines(vllm_model):
    from mathctl.engines.vllm import VLLMEngine

    vllm_engine = VLLMEngine(ModelSpec(path=str(vllm_model)), EngineConfig(backend="vllm", max_model_len=256))
    hf_engine = HFEngine(ModelSpec(path=str(vllm_model)), EngineConfig(max_model_len=256))
    yield vllm_engine, hf_engine
    vllm_engine.close()


def test_greedy_token_ids_are_identical(engines):
    vllm_engine, hf_engine = engines
    assert vllm_engine.in_process and vllm_engine.dtype == torch.float32
    sampling = SamplingConfig(max_new_tokens=24, logprobs=True)
    got, want = vllm_engine.generate(PROMPTS, sampling), hf_engine.generate(PROMPTS, sampling)
    assert len(got) == len(PROMPTS) >= 16
    for a, b in zip(got, want):
        assert a[0].token_ids == b[0].token_ids
        assert (a[0].text, a[0].finish_reason, a[0].stop_reason) == (b[0].text, b[0].finish_reason, b[0].stop_reason)
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)
    assert len({tuple(s[0].token_ids) for s in got}) > 10  # the model really varies its output


@pytest.mark.parametrize("top_k, top_p", [(None, 1.0), (20, 1.0), (None, 0.8)])
def test_sampled_logprobs_match_teacher_forcing_on_both(engines, top_k, top_p):
    vllm_engine, hf_engine = engines
    sampling = SamplingConfig(n=2, temperature=0.8, top_k=top_k, top_p=top_p, max_new_tokens=12, logprobs=True, seed=5)
    ids = encode_prompts(hf_engine.tokenizer, PROMPTS[:4])
    for engine in (vllm_engine, hf_engine):
        for prompt_ids, samples in zip(ids, engine.generate(PROMPTS[:4], sampling)):
            assert len(samples) == 2 and samples[0].token_ids != samples[1].token_ids
            for sample in samples:
                expected = teacher_forced_logprobs(hf_engine.model, prompt_ids, sample.token_ids, 0.8, top_k, top_p)
                assert sample.logprobs == pytest.approx(expected, abs=1e-4), engine.backend


def test_seeded_samples_do_not_depend_on_batching(engines):
    vllm_engine, _ = engines
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=10, seed=7)
    together = vllm_engine.generate(PROMPTS[:6], sampling, prompt_seeds=list(range(10, 16)))
    alone = vllm_engine.generate(PROMPTS[2:3], sampling, prompt_seeds=[12])
    assert [s.token_ids for s in together[2]] == [s.token_ids for s in alone[0]]
    assert len({tuple(s.token_ids) for s in together[2]}) == 3


def test_stop_strings_follow_one_rule(engines):
    vllm_engine, hf_engine = engines
    free = hf_engine.generate(PROMPTS[:4], SamplingConfig(max_new_tokens=30))
    stop = hf_engine._decode(free[0][0].token_ids[6:7]).strip() or hf_engine._decode(free[0][0].token_ids[6:8])
    assert stop
    for include in (False, True):
        sampling = SamplingConfig(max_new_tokens=30, stop=[stop], include_stop_str=include)
        got, want = vllm_engine.generate(PROMPTS[:4], sampling), hf_engine.generate(PROMPTS[:4], sampling)
        for a, b in zip(got, want):
            assert (a[0].text, a[0].token_ids, a[0].finish_reason, a[0].stop_reason) == \
                (b[0].text, b[0].token_ids, b[0].finish_reason, b[0].stop_reason)
        first = got[0][0]
        assert first.finish_reason == "stop" and first.stop_reason == stop
        assert first.text.endswith(stop) if include else stop not in first.text


def test_eos_is_kept_in_the_ids_and_never_in_the_text(engines):
    """As if the 4th token prompt 0 produces were the EOS (both engines stop on the ids in `eos_ids`):
    the EOS id ends token_ids and is the stop reason; its text is not in `text` on either engine (vLLM
    itself would keep it with skip_special_tokens=False)."""
    vllm_engine, hf_engine = engines
    free = hf_engine.generate(PROMPTS[:4], SamplingConfig(max_new_tokens=20))
    eos = free[0][0].token_ids[3]
    saved = vllm_engine.eos_ids, hf_engine.eos_ids
    vllm_engine.eos_ids, hf_engine.eos_ids = {eos}, {eos}
    try:
        sampling = SamplingConfig(max_new_tokens=20, stop=["\n\n\n"], include_stop_str=True)
        got, want = vllm_engine.generate(PROMPTS[:4], sampling), hf_engine.generate(PROMPTS[:4], sampling)
    finally:
        vllm_engine.eos_ids, hf_engine.eos_ids = saved
    for a, b in zip(got, want):
        assert (a[0].text, a[0].token_ids, a[0].finish_reason, a[0].stop_reason) == \
            (b[0].text, b[0].token_ids, b[0].finish_reason, b[0].stop_reason)
    first = got[0][0]
    assert first.finish_reason == "stop" and first.stop_reason == eos and first.token_ids[-1] == eos
    assert first.text == hf_engine._decode(first.token_ids[:-1])


def test_too_long_prompt_is_the_same_error(vllm_model, engines):
    vllm_engine, hf_engine = engines
    long_prompt = "1 2 3 4 5 6 7 8 9 " * 40
    messages = []
    for engine in (vllm_engine, hf_engine):
        with pytest.raises(EngineError) as caught:
            engine.generate([PROMPTS[0], long_prompt], SamplingConfig(max_new_tokens=4))
        messages.append(caught.value.message)
    assert messages[0] == messages[1] and "prompt 1 has" in messages[0] and "256 at most" in messages[0]
    # a prompt that fits but leaves less room than max_new_tokens is cut at the model length on both
    near = "1 2 3 4 5 6 7 8 9 " * 13
    n = len(encode_prompts(hf_engine.tokenizer, [near])[0])
    got, want = (e.generate([near], SamplingConfig(max_new_tokens=200))[0][0] for e in (vllm_engine, hf_engine))
    assert len(got.token_ids) == len(want.token_ids) == 256 - n and got.finish_reason == "length"


def test_auto_stays_hf_on_a_cpu_with_vllm():
    assert not torch.cuda.is_available()
    assert resolve_backend("auto") == "hf"


def test_a_head_size_the_cpu_kernels_refuse_exits_2(cli, tmp_path):
    bench = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
    proc = cli("eval", "gsm8k", "--model", "tiny:qwen2-tiny", "--data-dir", str(bench), "--limit", "2",
               "engine.backend=vllm", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "attention head size 16" in proc.stderr and "engine.backend=hf" in proc.stderr
