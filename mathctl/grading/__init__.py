"""Math answer grading: extraction, normalisation, equivalence. Pure Python, no torch.

    extract_answer(text) -> str | None           the final answer a response states (extract.py)
    normalize_answer(text) -> str                a canonical spelling of an answer (normalize.py)
    equivalent(pred, gold) -> (bool, reason)     staged equivalence with time-limited sympy (equivalence.py)
    is_equivalent(pred, gold) -> bool            normalise both, then `equivalent`
    grade(response, gold) -> Grade               all of it for one response (grade.py)
    grade_batch / is_equivalent_batch            the same for many, symbolic checks in worker processes
    Choice(letters), choice_letters(answer)      multiple-choice golds and the option letters an answer names
"""

from mathctl.grading.choice import Choice, choice_letters
from mathctl.grading.equivalence import equivalent, equivalent_many, shutdown_workers
from mathctl.grading.extract import extract_answer, extract_boxed_all
from mathctl.grading.grade import Grade, grade, grade_batch, is_equivalent, is_equivalent_batch
from mathctl.grading.normalize import normalize_answer

answers_match = is_equivalent  # the name ARCHITECTURE.md uses

__all__ = [
    "Choice", "Grade", "answers_match", "choice_letters", "equivalent", "equivalent_many", "extract_answer",
    "extract_boxed_all", "grade", "grade_batch", "is_equivalent", "is_equivalent_batch", "normalize_answer",
    "shutdown_workers",
]
