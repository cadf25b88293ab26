"""Every real gold answer in ../shared/data/benchmarks grades as correct against itself when wrapped
in a response, and a perturbed copy (one digit changed, or another choice letter) grades as wrong.
Multiple-choice golds are `Choice`s, as the eval reads them (checked against `load_problems`), and are
also answered in the other ways a model states a choice."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mathctl.benchmarks import get_benchmark, load_problems
from mathctl.grading import Choice, extract_boxed_all, grade_batch

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"


def _field(name: str) -> Callable[[dict], object]:
    return lambda row: row[name]


def _choice_or_answer(row: dict) -> object:
    return Choice(row["choice_answer"]) if row.get("choice_answer") else row["answer"]


def _gaokao2024(row: dict) -> object:
    return Choice(row["answer"]) if row["type"] in ("single", "multi") else row["answer"]


# benchmark -> how to read its gold answer (README of ../shared/data)
GOLD: dict[str, Callable[[dict], object]] = {
    "gsm8k": lambda row: row["answer"].split("####")[-1].strip(),
    "math": _field("answer"),
    "math500": _field("answer"),
    "aime24": _field("answer"),
    "aime25": _field("answer"),
    "amc23": _field("answer"),
    "collegemath": _field("answer"),
    "gaokao2023en": _field("answer"),
    "olympiadbench": lambda row: row["final_answer"][0],
    "omni-math": _field("answer"),
    "minerva_math": lambda row: extract_boxed_all(row["solution"])[-1],
    "svamp": _field("Answer"),
    "asdiv": _field("answer"),
    "mawps": _field("target"),
    "sat_math": lambda row: Choice(row["Answer"]),
    "mmlu_stem": lambda row: Choice("ABCD"[row["answer"]]),
    "carp_en": _field("answer"),
    "cn_middle_school": _choice_or_answer,
    "gaokao2024_I": _gaokao2024,
    "gaokao2024_II": _gaokao2024,
    "gaokao2024_mix": _choice_or_answer,
}
# Tasks with multiple-choice questions, and the tasks (named as their folders) whose golds the eval's
# `load_problems` must read exactly as GOLD does (checked for the tasks added with choice golds).
CHOICE_TASKS = ("cn_middle_school", "gaokao2024_I", "gaokao2024_II", "gaokao2024_mix", "mmlu_stem", "sat_math")
EVAL_TASKS = ("carp_en", *CHOICE_TASKS)


def _usable(gold: object) -> bool:
    # data defects left as they are in the sources: empty gold answers (omni-math 9, gaokao2023en 2)
    # and one omni-math answer cut after a backslash
    text = _first(gold).strip()
    return bool(text) and not text.endswith("\\")


def _rows(name: str) -> list[dict]:
    path = BENCHMARKS / name / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared/data is beside the checkout in CI)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _golds(name: str) -> list[object]:
    return [g for g in (GOLD[name](row) for row in _rows(name)) if _usable(g)]


def _first(gold: object) -> str:
    if isinstance(gold, list):
        gold = gold[0]
    if isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    return str(gold)


def _respond(answer: str) -> str:
    return f"Working through the problem step by step, so the answer is $\\boxed{{{answer}}}$."


def perturb(answer: str) -> str | None:
    """Change the first digit (d -> d+1 mod 10) outside a subscript (`x_{3}` only renames a variable),
    a lone choice letter to the next one, or drop the last of several choice letters."""
    if re.fullmatch(r"[A-E]", answer.strip()):
        return "ABCDEA"["ABCDE".index(answer.strip()) + 1]
    if re.fullmatch(r"[A-E]{2,}", answer.strip()):
        return answer.strip()[:-1]
    match = re.search(r"(?<!_)(?<!_\{)\d", answer)
    if match is None:
        return None
    digit = str((int(match.group()) + 1) % 10)
    return answer[: match.start()] + digit + answer[match.end():]


@pytest.mark.parametrize("name", sorted(GOLD))
def test_gold_grades_correct_against_itself(name):
    golds = _golds(name)
    grades = grade_batch([_respond(_first(g)) for g in golds], golds, timeout_s=2.0)
    wrong = [(g, grade.extracted, grade.reason) for g, grade in zip(golds, grades) if not grade.correct]
    assert not wrong, f"{len(wrong)} of {len(golds)} golds not matched by themselves, e.g. {wrong[:5]}"


@pytest.mark.parametrize("name", sorted(GOLD))
def test_perturbed_gold_grades_wrong(name):
    golds = _golds(name)
    random.Random(0).shuffle(golds)
    cases = [(g, perturb(_first(g))) for g in golds[:300]]
    cases = [(g, p) for g, p in cases if p is not None]
    grades = grade_batch([_respond(p) for _, p in cases], [g for g, _ in cases], timeout_s=2.0)
    accepted = [(g, p, grade.reason) for (g, p), grade in zip(cases, grades) if grade.correct]
    assert not accepted, f"{len(accepted)} of {len(cases)} perturbed golds accepted, e.g. {accepted[:5]}"


@pytest.mark.parametrize("name", EVAL_TASKS)
def test_eval_reads_the_golds_tested_here(name):
    rows = _rows(name)
    problems = load_problems(get_benchmark(name), BENCHMARKS)
    expected = [GOLD[name](row) for row in rows]
    assert [p.gold for p in problems] == expected
    assert [type(p.gold) for p in problems] == [type(g) for g in expected]  # Choice where the question has options


def _choice_responses(letters: str) -> list[str]:
    """The ways a model states option letters that the grader accepts."""
    listed = ", ".join(letters)
    forms = [f"The answer is ({letters[0]}).", f"\\boxed{{\\text{{({letters[0]})}}}}", f"\\boxed{{{letters[0]}) 7}}"]
    if len(letters) > 1:
        forms = [f"so the answer is \\boxed{{{listed}}}", f"\\boxed{{{letters[::-1]}}}", f"The answer is {listed}.",
                 " and ".join(f"\\boxed{{{c}}}" for c in letters)]
    return forms


@pytest.mark.parametrize("name", CHOICE_TASKS)
def test_choice_golds_accept_every_way_of_stating_the_letter(name):
    golds = [g for g in _golds(name) if isinstance(g, Choice)]
    assert golds
    cases = [(response, gold) for gold in golds for response in _choice_responses(gold)]
    grades = grade_batch([r for r, _ in cases], [g for _, g in cases], workers=0)
    wrong = [(r, g, grade.extracted, grade.reason) for (r, g), grade in zip(cases, grades) if not grade.correct]
    assert not wrong, f"{len(wrong)} of {len(cases)} not accepted, e.g. {wrong[:5]}"
    # another option, or the option's value instead of its letter, is wrong
    others = [(f"\\boxed{{{perturb(g)}}}", g) for g in golds] + [("\\boxed{7}", g) for g in golds]
    grades = grade_batch([r for r, _ in others], [g for _, g in others], workers=0)
    assert not any(grade.correct for grade in grades)
