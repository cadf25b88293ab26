"""`grade(response, gold) -> Grade`: extraction, normalisation and equivalence in one call.

The one place eval metrics and GRPO rewards get their verdicts from, so the two cannot drift apart.
Gold answers are normalised but never "extracted" (they are answers already); a gold given as a
list (MATH has a few rows with several accepted answers) is matched if any entry matches. Numbers
are accepted as gold (AIME files store ints, AMC floats).

Batch grading resolves the cheap stages in this process and sends only symbolic comparisons to a
pool of worker processes, each under a wall-clock limit (see equivalence.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mathctl.grading.equivalence import equivalent, equivalent_many
from mathctl.grading.extract import extract_answer
from mathctl.grading.normalize import normalize_answer

Gold = str | int | float | Sequence[str | int | float]


@dataclass(frozen=True)
class Grade:
    """The verdict on one response."""

    correct: bool
    extracted: str | None  # the answer found in the response (None: no answer)
    pred_normalized: str | None
    gold_normalized: str
    reason: str  # which stage decided: exact, numeric, structure, symbolic, timeout, no_answer, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gold_strings(gold: Gold) -> list[str]:
    """Gold answers as strings: `27.0` -> `27`, lists kept as alternatives."""
    items = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    out = []
    for item in items:
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        out.append(str(item))
    return out


def is_equivalent(pred: str, gold: Gold, *, timeout_s: float = 1.0) -> bool:
    """Whether two answers (not whole responses) are mathematically the same."""
    pred_norm = normalize_answer(str(pred))
    return any(equivalent(pred_norm, normalize_answer(g), timeout_s=timeout_s)[0] for g in gold_strings(gold))


def grade(response: str, gold: Gold, *, timeout_s: float = 1.0) -> Grade:
    """Extract the final answer of `response` and decide whether it equals `gold`."""
    return grade_batch([response], [gold], timeout_s=timeout_s, workers=0)[0]


def is_equivalent_batch(preds: Sequence[str], golds: Sequence[Gold], *, timeout_s: float = 1.0,
                        workers: int | None = None) -> list[bool]:
    return [g.correct for g in grade_batch(preds, golds, timeout_s=timeout_s, workers=workers, extract=False)]


def grade_batch(responses: Sequence[str], golds: Sequence[Gold], *, timeout_s: float = 1.0,
                workers: int | None = None, extract: bool = True) -> list[Grade]:
    """Grade many responses. `workers=0` keeps everything in this process (symbolic checks still run
    in the time-limited worker); None sizes the pool to the machine."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    extracted = [extract_answer(r) if extract else (str(r) if r is not None else None) for r in responses]
    pred_norms = [normalize_answer(e) if e is not None else None for e in extracted]
    gold_lists = [[normalize_answer(g) for g in gold_strings(gold)] for gold in golds]
    pairs: list[tuple[str, str]] = []
    owners: list[int] = []
    for i, (pred, alternatives) in enumerate(zip(pred_norms, gold_lists)):
        if pred is None or pred == "":
            continue
        for alt in alternatives:
            pairs.append((pred, alt))
            owners.append(i)
    verdicts = equivalent_many(pairs, timeout_s=timeout_s, workers=workers) if pairs else []
    best: dict[int, tuple[bool, str]] = {}
    for owner, (ok, reason) in zip(owners, verdicts):  # any accepted alternative wins
        if owner not in best or (ok and not best[owner][0]):
            best[owner] = (ok, reason)
    grades = []
    for i, (raw, pred) in enumerate(zip(extracted, pred_norms)):
        ok, reason = best.get(i, (False, "no_answer"))  # no entry: nothing was extracted to compare
        grades.append(Grade(ok, raw, pred, gold_lists[i][0] if gold_lists[i] else "", reason))
    return grades
