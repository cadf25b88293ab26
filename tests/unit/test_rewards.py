"""Reward functions: hand-computed values for every built-in, the weighted combination, the registry."""

from __future__ import annotations

import pytest

from mathctl.core.errors import ConfigError
from mathctl.rewards import (
    RewardsConfig,
    boxed_format,
    correctness,
    get_reward,
    length_penalty,
    safe_arithmetic,
    step_format,
    stepwise,
)

MATH_MIND = (
    "<begin_steps>\n<STEP 1> Each box holds 12 eggs and there are 3 boxes: @@@@ 12*3 = 36 @@@@ </STEP>\n"
    "<STEP 2> Half are eaten: @@@@ 36/2 = 18 @@@@ </STEP>\n#### 18"
)


def test_correctness_and_boxed_format():
    completions = ["so \\boxed{18}", "so \\boxed{17}", "the answer is 18", "\\boxed{}"]
    golds = ["18", "18", "18", "18"]
    assert correctness([""] * 4, completions, golds) == [1.0, 0.0, 1.0, 0.0]
    assert boxed_format([""] * 4, completions, golds) == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "text, score",
    [
        (MATH_MIND, 1.0),
        (MATH_MIND.replace("<begin_steps>\n", ""), 0.75),  # no opening tag
        (MATH_MIND.replace("<STEP 2>", "<STEP 3>"), 0.75),  # numbering gap
        (MATH_MIND.replace("@@@@ 36/2 = 18 @@@@", "").replace("@@@@ 12*3 = 36 @@@@", ""), 0.75),  # no equation
        (MATH_MIND.replace("#### 18", "so 18"), 0.75),  # no final answer line
        ("just 18", 0.0),
    ],
)
def test_step_format(text, score):
    assert step_format([""], [text], ["18"]) == [score]


@pytest.mark.parametrize(
    "text, score",
    [
        (MATH_MIND, 1.0),  # both true, and 36 feeds 36/2 = 18, the answer
        (MATH_MIND.replace("36/2 = 18", "36/2 = 19"), 0.0),  # the last step is false: nothing chains to 18
        (MATH_MIND.replace("12*3 = 36", "12*3 = 35"), 0.5),  # first false, second still true and final
        (MATH_MIND.replace("12*3 = 36", "5*5 = 25"), 0.5),  # true but 25 is not used later
        ("no equations #### 18", 0.0),
    ],
)
def test_stepwise(text, score):
    assert stepwise([""], [text], ["18"]) == [pytest.approx(score)]


@pytest.mark.parametrize(
    "expression, value",
    [("12*3", 36.0), ("1,200 / 4", 300.0), ("2^10", 1024.0), ("3 x 4", 12.0), ("(2+3)*4", 20.0), ("-5+2", -3.0),
     ("9**9**9", None),  # refused, not computed
     ("__import__('os')", None), ("1/0", None), ("", None)],
)
def test_safe_arithmetic(expression, value):
    assert safe_arithmetic(expression) == value


def test_length_penalty():
    assert length_penalty(["a" * 10, "a" * 15, "a" * 30], soft=10, hard=20) == [0.0, -0.5, -1.0]


def test_weighted_combination_reports_each_function():
    config = RewardsConfig(weights={"correctness": 1.0, "boxed_format": 0.5, "length_penalty": 0.1},
                           length_soft_chars=5, length_hard_chars=15)
    totals, per_function = config.compute(["p", "p"], ["\\boxed{4}", "x"], ["4", "4"])
    assert per_function["correctness"] == [1.0, 0.0]
    assert per_function["boxed_format"] == [1.0, 0.0]
    assert per_function["length_penalty"] == [-0.4, 0.0]
    assert totals == pytest.approx([1.0 + 0.5 - 0.04, 0.0])


def test_registry_misses_list_what_exists_and_user_functions_import():
    with pytest.raises(ConfigError, match="available: correctness"):
        get_reward("boxed_acc")
    assert get_reward("mathctl.rewards:stepwise") is stepwise
    with pytest.raises(ConfigError, match="cannot import"):
        get_reward("no_such_module:fn")
    with pytest.raises(ValueError, match="unknown reward"):
        RewardsConfig(weights={"corectness": 1.0})


def test_no_answer_count():
    from mathctl.rewards import no_answer_count

    # a box, a prose answer, a truncated box and a question: two answers found, two not
    assert no_answer_count(["so \\boxed{4}", "The answer is 7.", "so \\boxed{4", "Is it?"]) == 2
