"""Multiple-choice golds (`Choice`) and the option letters an answer names (`choice_letters`), alone and
through `grade` / `grade_batch` / `is_equivalent`."""

from __future__ import annotations

import json

import pytest

from mathctl.grading import Choice, choice_letters, grade, grade_batch, is_equivalent

LETTERS = [
    # letters alone, in the usual wrappers
    ("B", "B"),
    ("(B)", "B"),
    ("[B]", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("$B$", "B"),
    ("**B**", "B"),
    (r"\text{(B)}", "B"),  # the box content as extract_answer returns it
    (r"\mathrm{B}", "B"),
    ("（B）", "B"),  # full-width parentheses (Chinese text)
    ("(b)", "B"),  # a parenthesised lower-case letter is a label
    # a label, then the option's text
    ("B) 42", "B"),
    ("(B) 42", "B"),
    ("B. 42", "B"),
    ("B: 42", "B"),
    (r"\textbf{(C)}\ 12", "C"),  # AMC style, which normalize_answer leaves as `(C)12`
    (r"C. {x \mid-3<x<4}", "C"),  # gaokao2024_mix writes option answers this way
    # a prefix
    ("Option B", "B"),
    (r"\text{Choice (C)}", "C"),
    ("选B", "B"),
    # several options (multi-select): sorted, repeats once
    ("ACD", "ACD"),
    ("A, C, D", "ACD"),
    ("D,C,A", "ACD"),
    ("(A)(C)", "AC"),
    ("A and C", "AC"),
    ("A、C", "AC"),
    ("A; A; C", "AC"),
    # not a label
    ("b", None),  # a bare lower-case letter is a variable
    ("42", None),
    (r"\frac{1}{2}", None),
    ("x", None),
    ("A right triangle", None),  # a letter starting words
    ("A or C", None),  # a hedge names no option
    ("B2", None),
    ("F", None),  # letters run A-E
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("answer", "expected"), LETTERS)
def test_choice_letters(answer, expected):
    assert choice_letters(answer) == expected


def test_choice_gold_is_sorted_letters_and_a_plain_string_in_json():
    assert Choice("DCA") == "ACD" and Choice(" B ") == "B"
    assert Choice.from_index(0) == "A" and Choice.from_index(3) == "D"
    assert json.dumps({"gold": Choice("B")}) == '{"gold": "B"}'  # results.jsonl shows the letter
    for bad in ("", "F", "b", "A1", "(B)"):
        with pytest.raises(ValueError):
            Choice(bad)
    for bad in (-1, 5, True):
        with pytest.raises(ValueError):
            Choice.from_index(bad)


GRADES = [
    # (response, gold, correct, reason)
    (r"... so the answer is $\boxed{B}$.", "B", True, "choice"),
    ("The answer is (B).", "B", True, "choice"),
    ("Therefore, the answer is B) 42", "B", True, "choice"),
    (r"\boxed{(B) 42}", "B", True, "choice"),
    (r"\boxed{\text{(B) } 42}", "B", True, "choice"),
    ("Comparing them, the correct option is B.", "B", True, "choice"),
    ("答案是 B", "B", True, "choice"),
    (r"\boxed{C}", "B", False, "choice"),
    (r"\boxed{42}", "B", False, "not_a_choice"),  # option B's value is not its letter
    ("I cannot tell.", "B", False, "not_a_choice"),
    ("", "B", False, "no_answer"),
    (r"\boxed{AB}", "B", False, "choice"),  # two options for a one-option question
    # multi-select
    (r"\boxed{ACD}", "ACD", True, "choice"),
    (r"\boxed{A, C, D}", "ACD", True, "choice"),
    (r"\boxed{D, A, C}", "ACD", True, "choice"),  # any order
    (r"so \boxed{A}, \boxed{C} and \boxed{D}", "ACD", True, "choice"),  # one box per option
    ("The answer is A, C, D.", "ACD", True, "choice"),
    (r"\boxed{AC}", "ACD", False, "choice"),  # no partial credit
    (r"\boxed{ABCD}", "ACD", False, "choice"),
    (r"\boxed{A}, \boxed{2}, \boxed{D}", "ACD", False, "choice"),  # a value among the boxes spoils the set
]


@pytest.mark.parametrize(("response", "gold", "correct", "reason"), GRADES)
def test_grade_against_choice_gold(response, gold, correct, reason):
    result = grade(response, Choice(gold))
    assert (result.correct, result.reason) == (correct, reason), result
    assert result.gold_normalized == gold


def test_choice_letters_are_the_normalised_answer_so_votes_agree():
    grades = grade_batch([r"\boxed{(B) 42}", "The answer is B.", r"\boxed{\text{B}}"], [Choice("B")] * 3, workers=0)
    assert {g.pred_normalized for g in grades} == {"B"}


def test_a_plain_letter_gold_is_still_a_math_answer():
    # Without the Choice type nothing changes: `x = B` is an assignment whose value is the variable B.
    assert grade(r"\boxed{B}", "B").correct
    assert not grade(r"\boxed{(B) 42}", "B").correct
    assert grade(r"\boxed{(B) 42}", Choice("B")).correct


def test_batches_mix_choice_and_math_golds():
    responses = [r"\boxed{B}", r"\boxed{\frac{1}{2}}", r"\boxed{0.5}", "The answer is (D)."]
    golds = [Choice("B"), "1/2", "\\frac12", Choice("C")]
    assert [g.correct for g in grade_batch(responses, golds, workers=0)] == [True, True, True, False]


def test_is_equivalent_with_a_choice_gold():
    assert is_equivalent("(C) 12", Choice("C"))
    assert is_equivalent("C, A", Choice("AC"))
    assert not is_equivalent("12", Choice("C"))
