"""DPO pieces without training: the four losses against hand computation, pair rows in every accepted shape,
response-only labels, the held-out split, and the choice of pairs for `mathctl data pairs`."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mathctl.core.errors import DataError
from mathctl.dpo import DPOData, encode_pairs, preference_loss, row_to_conversation, split_pairs
from mathctl.pairs import choose_pairs
from mathctl.rows import IGNORE

# toy summed log-probs of one pair: policy chosen -10 over 4 tokens, rejected -12 over 2; reference -11 and -11
PI_C, PI_R, REF_C, REF_R, LEN_C, LEN_R = -10.0, -12.0, -11.0, -11.0, 4.0, 2.0


def _loss(loss_type: str, beta: float, gamma: float = 0.0):
    t = lambda v: torch.tensor([v])  # noqa: E731
    losses, rc, rr = preference_loss(loss_type, t(PI_C), t(PI_R), t(REF_C), t(REF_R), t(LEN_C), t(LEN_R),
                                     beta=beta, gamma=gamma)
    return float(losses[0]), float(rc[0]), float(rr[0])


def _softplus_neg(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_sigmoid_is_dpo_on_summed_log_ratios():
    # log-ratios: chosen -10 - -11 = 1, rejected -12 - -11 = -1; beta 0.1 -> -log sigmoid(0.1 * 2)
    loss, rc, rr = _loss("sigmoid", 0.1)
    assert loss == pytest.approx(_softplus_neg(0.2), abs=1e-6)
    assert loss == pytest.approx(0.5981388, abs=1e-6)
    assert (rc, rr) == pytest.approx((0.1, -0.1))


def test_dpo_norm_averages_each_response_over_its_tokens():
    # chosen 1 / 4 = 0.25, rejected -1 / 2 = -0.5; beta 5 -> -log sigmoid(5 * 0.75)
    loss, rc, rr = _loss("dpo_norm", 5.0)
    assert loss == pytest.approx(_softplus_neg(3.75), abs=1e-6)
    assert loss == pytest.approx(0.0232449, abs=1e-6)
    assert (rc, rr) == pytest.approx((1.25, -2.5))


def test_ipo_squares_the_distance_to_one_over_two_beta():
    # h = 0.25 - -0.5 = 0.75 (TRL's per-token averages); beta (tau) 0.5 -> (0.75 - 1)^2
    loss, rc, rr = _loss("ipo", 0.5)
    assert loss == pytest.approx(0.0625, abs=1e-7)
    assert (rc, rr) == pytest.approx((0.125, -0.25))


def test_simpo_needs_no_reference():
    # average log-probs -10 / 4 = -2.5 and -12 / 2 = -6; beta 2, gamma 1 -> -log sigmoid(2 * 3.5 - 1)
    loss, rc, rr = _loss("simpo", 2.0, gamma=1.0)
    assert loss == pytest.approx(_softplus_neg(6.0), abs=1e-7)
    assert loss == pytest.approx(0.0024757, abs=1e-6)
    assert (rc, rr) == pytest.approx((-5.0, -12.0))
    t = lambda v: torch.tensor([v])  # noqa: E731
    again, _, _ = preference_loss("simpo", t(PI_C), t(PI_R), None, None, t(LEN_C), t(LEN_R), beta=2.0, gamma=1.0)
    assert float(again[0]) == pytest.approx(loss)


def test_policy_equal_to_reference_gives_log_two_and_zero_margin():
    x = torch.tensor([-3.0, -7.5])
    n = torch.tensor([3.0, 5.0])
    for loss_type in ("sigmoid", "dpo_norm"):
        losses, rc, rr = preference_loss(loss_type, x, x + 1, x, x + 1, n, n, beta=0.3)
        assert torch.allclose(losses, torch.full((2,), math.log(2.0)))
        assert torch.equal(rc, rr) and not bool((rc > rr).any())  # ties: accuracy 0 at step 0


def test_loss_gradient_raises_the_chosen_and_lowers_the_rejected():
    c = torch.tensor([-5.0], requires_grad=True)
    r = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = preference_loss("sigmoid", c, r, torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([2.0]),
                                   torch.tensor([2.0]), beta=1.0)
    losses.sum().backward()
    assert float(c.grad) == pytest.approx(-0.5) and float(r.grad) == pytest.approx(0.5)


# --- pair rows ------------------------------------------------------------------------------------
DATA = DPOData(source="pairs.jsonl", prompt_template="{prompt}\nAnswer in a box.", system_prompt=None)
USER = {"role": "user", "content": "What is 2+3?"}
GOOD, BAD = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "6"}


@pytest.mark.parametrize("row, prompt", [
    ({"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"},
     [{"role": "user", "content": "What is 2+3?\nAnswer in a box."}]),
    ({"prompt": [USER], "chosen": "5", "rejected": "6"}, [USER]),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, [USER]),
    ({"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]}, [USER]),  # prompt repeated in both
    # UltraFeedback-binarized: a text prompt beside full conversations that share it
    ({"prompt": "What is 2+3?", "chosen": [USER, GOOD], "rejected": [USER, BAD]}, [USER]),
    ({"chosen": [{"role": "system", "content": "Be brief."}, USER, GOOD],
      "rejected": [{"role": "system", "content": "Be brief."}, USER, BAD]},
     [{"role": "system", "content": "Be brief."}, USER]),
], ids=["text", "messages-text", "messages-assistant", "repeated-prompt", "ultrafeedback", "no-prompt-field"])
def test_every_pair_shape_gives_the_same_responses(row, prompt):
    got_prompt, chosen, rejected = row_to_conversation(row, DATA, "f.jsonl line 1")
    assert got_prompt == prompt and chosen == [GOOD] and rejected == [BAD]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "no field 'rejected'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' must be non-empty"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, "not of {role, content} messages"),
    ({"chosen": [USER, GOOD], "rejected": [USER, USER]}, "rejected response must start with an assistant"),
])
def test_bad_rows_name_the_place(row, message):
    with pytest.raises(DataError, match="f.jsonl line 7") as info:
        row_to_conversation(row, DATA, "f.jsonl line 7")
    assert message in info.value.message


def test_labels_cover_only_the_response(tiny_model):
    from mathctl.core.config import ModelSpec
    from mathctl.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_model), chat_template="chatml"))
    rows = [("f line 1", {"prompt": "What is 2+3?", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6"}),
            ("f line 2", {"prompt": "What is 1+1?", "chosen": "same", "rejected": "same"})]
    pairs, stats = encode_pairs(rows, DATA, tokenizer, max_len=256)
    assert stats["dropped_identical"] == 1 and stats["pairs"] == 1
    pair = pairs[0]
    for side in ("chosen", "rejected"):
        ids, labels = pair[side], pair[f"{side}_labels"]
        trained = [i for i, t in zip(ids, labels) if t != IGNORE]
        text = tokenizer.decode(trained)
        assert text.startswith("2 + 3 = 5" if side == "chosen" else "2 + 3 = 6")
        assert "What is" not in text and "<|im_end|>" in text  # the end of turn is trained, the prompt is not
        first = next(k for k, t in enumerate(labels) if t != IGNORE)
        assert all(t == IGNORE for t in labels[:first]) and tokenizer.decode(ids[:first]).endswith("assistant\n")
    assert pair["chosen_tokens"] == sum(t != IGNORE for t in pair["chosen_labels"][1:])
    # a max_len inside the prompt leaves no response token: the pair is dropped, and alone it is an error
    with pytest.raises(DataError, match="no pair"):
        encode_pairs(rows[:1], DATA, tokenizer, max_len=8)


def test_held_out_split_keeps_prompts_whole():
    pairs = [{"group": f"p{i // 3}", "id": i} for i in range(60)]  # 20 prompts, 3 pairs each
    train, held = split_pairs(pairs, 0.1, seed=4)
    assert {p["group"] for p in train}.isdisjoint({p["group"] for p in held})
    assert len(held) == 6 and len(train) == 54
    assert split_pairs(pairs, 0.1, seed=4) == (train, held)


# --- data pairs -----------------------------------------------------------------------------------
def test_choose_pairs_is_seeded_distinct_and_spreads_answers():
    correct, wrong = [0, 3, 5], [1, 2, 4, 6, 7]
    first = choose_pairs(correct, wrong, 3, random.Random(7))
    assert first == choose_pairs(correct, wrong, 3, random.Random(7))
    assert len(first) == len(set(first)) == 3
    assert {c for c, _ in first} == set(correct) and len({w for _, w in first}) == 3  # no answer used twice
    assert set(choose_pairs(correct, wrong, 100, random.Random(0))) == {(c, w) for c in correct for w in wrong}
    assert choose_pairs([], wrong, 2, random.Random(0)) == [] and choose_pairs(correct, [], 2, random.Random(0)) == []


def test_pipeline_stages_pass_pairs_to_dpo(tmp_path):
    from mathctl.pipeline import PipelineConfig, Stage, headline, outputs_of

    cfg = PipelineConfig(stages=[
        {"name": "pairs", "step": "pairs", "recipe": "quickstart-pairs", "overrides": ["model.path=m"]},
        {"name": "dpo", "step": "dpo", "recipe": "quickstart-dpo", "overrides": ["data.source={stages.pairs.path}"]}])
    pairs_stage, dpo_stage = cfg.stages
    pairs_summary = {"status": "completed", "path": str(tmp_path / "pairs.jsonl"), "pairs": 10, "with_both": 5,
                     "problems": 8, "sample_accuracy": 0.5}
    assert outputs_of(pairs_stage, pairs_summary, tmp_path)["path"] == str(tmp_path / "pairs.jsonl")
    assert headline(pairs_stage, pairs_summary, tmp_path).startswith("10 pairs from 5 of 8 problems")
    dpo_summary = {"final_dir": str(tmp_path / "final"), "eval_accuracy": 0.75, "eval_accuracy_start": 0.0,
                   "eval_likelihood_accuracy": 0.8, "eval_likelihood_accuracy_start": 0.6, "eval_margin": 0.4}
    assert outputs_of(dpo_stage, dpo_summary, tmp_path)["final"] == str(tmp_path / "final")
    assert headline(dpo_stage, dpo_summary, tmp_path) == ("held-out preference accuracy 0.000 -> 0.750, likelihood "
                                                          "accuracy 0.600 -> 0.800, margin 0.400")
    assert isinstance(pairs_stage, Stage)


def test_memory_plan_counts_both_rows_and_no_reference_model():
    from mathctl.core.config import load_recipe
    from mathctl.dpo import DPOConfig
    from mathctl.memory_plan import plan_memory

    cfg, _ = load_recipe("dpo", DPOConfig, "tulu3-dpo-8b", ["launch.gpu_memory_gb=80"])
    plan = plan_memory("dpo", cfg)
    assert plan.known and plan.tokens == 2 * 1 * 2048  # the chosen and the rejected row of one pair
    assert plan.parts["reference"] == 0  # cached log-probs, no second model
    assert plan.parts["logits"] == 3 * 4 * 1024 * 128264  # logits_chunk_tokens positions at a time
    assert plan.total < 80 * 2**30
