"""`mathctl rm`: losses against hand-computed values, pair files, step scoring, the scoring API."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mathctl.core.errors import DataError
from mathctl.rm import (
    RewardScorer,
    RMData,
    SyntheticPairs,
    _positions_for_ends,
    load_pairs,
    load_reward_model,
    pair_weights,
    pairwise_loss,
    split_steps,
    synthetic_pairs,
)


def test_pairwise_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, 0, -2
    each = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(2.0))]
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(sum(each) / 3, rel=1e-6)
    assert float(pairwise_loss(chosen, rejected, reduction="sum")) == pytest.approx(sum(each), rel=1e-6)
    w = [0.5, 1.0, 0.25]
    weighted = sum(a * b for a, b in zip(w, each))
    assert float(pairwise_loss(chosen, rejected, w)) == pytest.approx(weighted / sum(w), rel=1e-6)
    assert float(pairwise_loss(chosen, rejected, w, reduction="sum")) == pytest.approx(weighted, rel=1e-6)
    assert float(pairwise_loss(chosen, rejected, w, normalizer=10.0)) == pytest.approx(weighted / 10, rel=1e-6)


def test_rstar_pair_weights():
    assert pair_weights([2, 3, 0, None], [4, 0, 0, 1], "counts") == [1 / 8, 1 / 3, 1.0, 1.0]
    assert pair_weights([2], [4], "none") == [1.0]


def test_synthetic_pairs_differ_only_in_the_result():
    pairs = synthetic_pairs(SyntheticPairs(num_problems=20, max_digits=1), "process")
    assert len(pairs) >= 20
    for p in pairs:
        assert p["pos"] != p["neg"] and p["pos"].endswith("\n")
        good = p["pos"].split("=")[1].split()[0]
        bad = p["neg"].split("=")[1].split()[0]
        a, op, b = p["pos"].split("=")[0].split()[-3:]
        assert int(good) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and int(bad) != int(good)
    outcome = synthetic_pairs(SyntheticPairs(num_problems=5), "outcome")
    assert len(outcome) == 5 and all(o["chosen"] != o["rejected"] for o in outcome)


BAD_LINES = [
    ('{"question": "q", "prefix": [], "pos": "a"}', "no field 'neg'"),
    ('{"question": "q", "prefix": [], "pos": "a", "neg": ""}', "'neg' must be a non-empty string"),
    ('{"question": "q", "prefix": 3, "pos": "a", "neg": "b"}', "'prefix' must be a list"),
    ('{"question": "q", "pos": "a", "neg": "b", "pos_count": -1}', "'pos_count' must be a whole number"),
    ('{"question": "q", "pos": "a", ', "line 2"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_pair_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "q", "prefix": ["s1\\n"], "pos": "a\\n", "neg": "b\\n"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(RMData(source=str(path)), "process")
    assert "line 2" in err.value.message and message in err.value.message


def test_pair_formats(tmp_path):
    path = tmp_path / "rstar.jsonl"
    path.write_text(json.dumps({"prompt": "<|user|>:\nq\n<|assistant|>: ", "pos": "x<end_of_step>",
                                "neg": "y<end_of_step>", "pos_count": 2, "neg_count": 1}) + "\n")
    rows = load_pairs(RMData(source=str(path)), "process")
    assert rows[0]["prompt"].startswith("<|user|>") and rows[0]["prefix"] == []
    outcome = tmp_path / "o.jsonl"
    outcome.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match="line 1: no field 'rejected'"):
        load_pairs(RMData(source=str(outcome)), "outcome")
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(RMData(source=str(tmp_path / "none.jsonl")), "process")


def test_split_steps():
    assert split_steps("<code>\nx=1<end_of_step>\nprint(x)<end_of_code>\n<answer>\\boxed{1}<end_of_answer>") == [
        "<code>\nx=1<end_of_step>", "\nprint(x)<end_of_code>", "\n<answer>\\boxed{1}<end_of_answer>"]
    assert split_steps("a = 1\n\nb = 2\nThe answer is 3.") == ["a = 1\n", "\nb = 2\n", "The answer is 3."]


def test_positions_for_ends():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 12)]
    assert _positions_for_ends(offsets, [5, 12]) == [1, 3]
    assert _positions_for_ends(offsets, [6, 12]) == [1, 3]  # a token crossing the end belongs to the next step


def test_scorer_reads_each_step_where_training_reads_it(tiny_model, tokenizer):
    """One pass over a trajectory gives, for step k, the value the model computes for prefix + step k
    alone, cut after its last non-whitespace character (where training reads it: not on the newline)."""
    from mathctl.core.config import ModelSpec
    from mathctl.models import load_tokenizer
    from mathctl.rm import render_prompt

    tok = load_tokenizer(ModelSpec(path=str(tiny_model), chat_template="chatml"))
    model = load_reward_model(ModelSpec(path=str(tiny_model), chat_template="chatml"), tok, init_std=0.5)
    scorer = RewardScorer(model, tok)
    steps = ["Ava starts with 5 pens.\n", "She buys 3, so 5 + 3 = 8 pens.\n", "The answer is \\boxed{8}.\n"]
    joint = scorer.score("Ava has 5 pens and buys 3. How many?", steps)
    head = render_prompt(tok, "Ava has 5 pens and buys 3. How many?", "{prompt}")
    alone = []
    for k in range(len(steps)):
        ids = tok(head + "".join(steps[:k]) + steps[k].rstrip(), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]))
        alone.append(float(out.logits[0, 0]))  # the model's own pooled score: the last token
    assert len(joint) == 3 and joint == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 4) for v in joint)) == 3
    many = scorer.score_many([("q1", steps[:1]), ("Ava has 5 pens and buys 3. How many?", steps)])
    assert many[1] == pytest.approx(joint, abs=1e-5)
    assert scorer.score_outcome("q", "x = 1\n") == pytest.approx(scorer.score("q", ["x = 1\n"])[-1], abs=1e-6)
    scorer.close()
