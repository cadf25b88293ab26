"""`grade(response, gold) -> Grade`: extraction, normalisation and equivalence in one call.

The one place eval metrics and GRPO rewards get their verdicts from, so the two cannot drift apart.
Gold answers are read in their benchmark's form (`gold_answer`): a bare answer is used as is, a gold that
holds boxes or a GSM8K `####` line gives that answer, JSON-doubled backslashes are halved, and a list (or a
string holding a JSON list) gives alternatives, any of which may match. Numbers are accepted as gold (AIME
files store ints, AMC floats). Gold-first: when the gold is a list and the response boxes several answers,
the boxes together are a second candidate (`box_set`). A `Choice` gold (option letters, choice.py) is
matched by the option letters the extracted answer names, with reason `choice` (or `not_a_choice` when
the answer names no option: a value, even the right option's value, is not a letter).

Batch grading resolves the cheap stages in this process and sends only symbolic comparisons to a
pool of worker processes, each under a wall-clock limit (see equivalence.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mathctl.grading.choice import Choice, choice_letters
from mathctl.grading.equivalence import equivalent, equivalent_many
from mathctl.grading.extract import extract_answer, extract_boxed_all
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
    """Gold answers as strings, each in the form of an answer (see `gold_answer`): `27.0` -> `27`; a list,
    or a string holding a JSON list of strings (`["\\\\pi", "180^\\\\circ"]`), gives alternatives."""
    items = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    out = []
    for item in items:
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        text = str(item)
        listed = _json_string_list(text)
        out.extend(gold_answer(t) for t in (listed if listed is not None else [text]))
    return out


def gold_answer(text: str) -> str:
    """The answer a gold string states, in the form its benchmark wrote it.

    - Backslashes doubled by JSON (`\\\\frac{2}{3}`, every backslash run of even length, at least one
      before a letter) are halved; a gold with any single command (`\\frac`, `\\\\` row breaks of a
      `\\begin{pmatrix}`) is left alone.
    - A gold holding `\\boxed{}` (a worked solution, or `$\\boxed{5}$`) gives its boxes: the last one, or all
      distinct ones as a list when there are several (a gold's boxes are all final). A GSM8K solution gives
      the text after `####`. Other golds are answers already and are not extracted.
    """
    text = answer_form(text)
    if "####" in text:
        found = extract_answer(text)
        if found:
            return found
    return text


def box_set(response: str) -> str | None:
    """All distinct non-empty boxes of `response` as one list (`\\boxed{2}, \\boxed{5}` -> `2, 5`), when
    there are two or more; else None.

    Tuple/set rules: graded against a gold list, the boxes form an unordered collection (`\\boxed{5}` and
    `\\boxed{2}` match `2, 5`); the candidate is tried only after the last box alone, and all boxes must
    match, so an intermediate boxed value makes the set wrong (never right). A box repeated in a recap
    counts once.
    """
    if not isinstance(response, str) or response.count("\\boxed") + response.count("\\fbox") < 2:
        return None
    boxes = list(dict.fromkeys(b for b in extract_boxed_all(response) if b))
    return ", ".join(boxes) if len(boxes) > 1 else None


def answer_form(text: str) -> str:
    """Repairs that apply to gold and extracted answers alike: JSON-doubled backslashes halved, and an
    answer that holds boxes (`(a,b) \\rightarrow \\boxed{(1,2)}`, a boxed box) replaced by its boxes."""
    if "\\\\" in text and _DOUBLED_COMMAND_RE.search(text) and all(
            len(run) % 2 == 0 for run in _BACKSLASH_RUN_RE.findall(text)):
        text = _BACKSLASH_RUN_RE.sub(lambda m: "\\" * (len(m.group()) // 2), text)
    if "\\boxed" in text or "\\fbox" in text:
        boxes = list(dict.fromkeys(b for b in extract_boxed_all(text) if b))
        if boxes:
            return ", ".join(boxes) if len(boxes) > 1 else boxes[0]
    return text


_BACKSLASH_RUN_RE = re.compile(r"\\+")
_DOUBLED_COMMAND_RE = re.compile(r"(?<!\\)\\\\[A-Za-z]")


def _json_string_list(text: str) -> list[str] | None:
    """`["a", "b"]` -> ["a", "b"]; anything else (`[1, 2]` is an interval) -> None."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]") and '"' in text):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def is_equivalent(pred: str, gold: Gold, *, timeout_s: float = 1.0) -> bool:
    """Whether two answers (not whole responses) are mathematically the same (for a `Choice` gold: whether
    `pred` names the same option letters)."""
    if isinstance(gold, Choice):
        return choice_letters(str(pred)) == gold
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
    extracted = [answer_form(e) if e is not None and "\\" in e else e for e in extracted]
    pred_norms = [normalize_answer(e) if e is not None else None for e in extracted]
    # Choice golds are decided here, by option letters; the rest go through equivalence below.
    choices = {i: _grade_choice(responses[i] if extract else None, extracted[i], pred_norms[i], gold)
               for i, gold in enumerate(golds) if isinstance(gold, Choice)}
    gold_lists = [[] if i in choices else [normalize_answer(g) for g in gold_strings(gold)]
                  for i, gold in enumerate(golds)]
    # Several boxes against a gold list: the boxes together are a second candidate (see `box_set`).
    box_sets: dict[int, str] = {}
    if extract:
        for i, response in enumerate(responses):
            if i not in choices and any("," in g for g in gold_lists[i]):
                joined = box_set(response)
                if joined is not None:
                    box_sets[i] = joined
    pairs: list[tuple[str, str]] = []
    owners: list[tuple[int, int]] = []  # (response, candidate: 0 the extracted answer, 1 the box set)
    for i, (pred, alternatives) in enumerate(zip(pred_norms, gold_lists)):
        candidates = [pred] + ([normalize_answer(box_sets[i])] if i in box_sets else [])
        for k, cand in enumerate(candidates):
            if cand is None or cand == "":
                continue
            for alt in alternatives:
                pairs.append((cand, alt))
                owners.append((i, k))
    verdicts = equivalent_many(pairs, timeout_s=timeout_s, workers=workers) if pairs else []
    best: dict[int, tuple[bool, str, int]] = {}
    for (owner, k), (ok, reason) in zip(owners, verdicts):  # any accepted candidate or alternative wins
        if owner not in best or (ok and not best[owner][0]):
            best[owner] = (ok, reason, k)
    grades = []
    for i, (raw, pred) in enumerate(zip(extracted, pred_norms)):
        if i in choices:
            grades.append(choices[i])
            continue
        ok, reason, k = best.get(i, (False, "no_answer", 0))  # no entry: nothing was extracted to compare
        if k == 1:
            raw, pred = box_sets[i], normalize_answer(box_sets[i])
        grades.append(Grade(ok, raw, pred, gold_lists[i][0] if gold_lists[i] else "", reason))
    return grades


def _grade_choice(response: str | None, extracted: str | None, pred_norm: str | None, gold: Choice) -> Grade:
    """The verdict for a `Choice` gold: the option letters of the extracted answer against the gold's. For a
    multi-select gold, one box per option (`\\boxed{A}, \\boxed{C}`) counts as the set of those boxes."""
    letters = choice_letters(extracted)
    if response is not None and len(gold) > 1 and letters != gold:
        joined = box_set(response)
        if joined is not None and choice_letters(joined) == gold:
            extracted, letters = joined, gold
    reason = "no_answer" if extracted is None else "choice" if letters else "not_a_choice"
    # the letters are the normalised answer, so maj@k votes for an option however it was written
    return Grade(letters == gold, extracted, letters or pred_norm, str(gold), reason)
