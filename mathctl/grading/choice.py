"""Multiple-choice answers: a gold answer that names options by letter, and the letters an answer names.

A benchmark question that lists lettered options (MMLU-STEM, SAT math, the choice questions of the
Chinese gaokao and middle-school sets) has a `Choice` gold: `Choice("B")`, or `Choice("ACD")` when
several options are right (gaokao multi-select). `Choice` is a `str` holding the sorted letters, so it
is written to results files and shown like any gold; `grade_batch` recognises the type and compares
the option letters of the response's final answer with it, instead of comparing math expressions.

`choice_letters(answer)` reads the letters from an answer that `extract_answer` found. Accepted, after
removing `$`, `*`, braces, `\\text{}`-like wrappers and LaTeX spacing:

- letters only, each bare or in parentheses/brackets, run together or separated by spaces, commas,
  `;`, `、`, `&` or "and": `B`, `(B)`, `[B]`, `B.`, `B)`, `\\text{(B)}`, `ACD`, `A, C, D`, `(A)(C)`,
  `A and C`, `A、C`, full-width `（B）`; a parenthesised lower-case letter counts (`(b)` -> `B`), a
  bare one does not;
- one label followed by the option's text: `B) 42`, `(B) 42`, `B. 42`, `B: 42`, `\\textbf{(B)}\\ 42`;
- either form after a leading "option(s)", "choice", "选项" or "选": `Option B`, `\\text{Choice (C)}`.

The letters are A-E (as in `extract_answer`), returned sorted and without repeats. Anything else names
no option and gives None: a value (`42`, `\\frac{1}{2}`, even the correct option's value), a letter
inside words ("A right triangle"), a hedge ("A or C").

Not covered, on purpose or for now: matching an option's value or text to its letter (the options are
not passed to the grader, and the prompts of choice tasks ask for the letter); letters after E; partial
credit for multi-select (`AC` against `ACD` is wrong, as a multi-select answer is graded in these sets'
reference harness); choices stated only in prose that `extract_answer` does not read ("I pick B",
"故选B" without a box).
"""

from __future__ import annotations

import re

__all__ = ["CHOICE_LETTERS", "Choice", "choice_letters"]

CHOICE_LETTERS = "ABCDE"

# Wrappers removed before reading labels: text-style commands (their braces go with the next class),
# braces, Markdown emphasis, math delimiters.
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|boxed|fbox)\s*(?=\{)|[{}*$]|\\[()\[\]]")
_SPACING_RE = re.compile(r"\\(?:quad|qquad|[ ,;:!>])|~|\u3000")
_PREFIX_RE = re.compile(r"(?i:options?|choices?)\s*[:：]?\s*|选项|选")
# Separators between labels; a token between them must be labels only: `B`, `ACD`, `(A)(C)`, `[B]`, `B)`.
_SEPARATOR_RE = re.compile(r"\s*(?:,|，|;|；|、|&|\band\b)\s*|\s+")
_LABELS_RE = re.compile(r"(?:\([A-Ea-e]\)|\[[A-E]\]|[A-E]\)?)+")
# One label, then the option's text: `(B) 42`, `B) 42`, `B. 42`, `B: 42` (a bare letter needs its `)`,
# `.` or `:` and a space, so "A right triangle" and "B2" are not labels).
_LEADING_LABEL_RE = re.compile(r"\(\s*([A-Ea-e])\s*\)|([A-E])(?:\)|[.:．：](?=\s))")
_FULL_WIDTH = str.maketrans("（）［］．：，", "()[].:,")
_MAX_LEN = 2_000  # an answer longer than this is not a choice label


class Choice(str):
    """A gold answer naming the correct option(s) by letter: the letters, sorted, without repeats.

    `Choice("B")`, `Choice("DCA") == "ACD"`, `Choice.from_index(2) == "C"` (0-based index into the
    options). Raises ValueError for anything but letters A-E.
    """

    def __new__(cls, letters: str) -> Choice:
        text = str(letters).strip()
        if not text or any(c not in CHOICE_LETTERS for c in text):
            raise ValueError(f"a choice gold is option letters {CHOICE_LETTERS[0]}-{CHOICE_LETTERS[-1]}, got {letters!r}")
        return super().__new__(cls, "".join(sorted(set(text))))

    @classmethod
    def from_index(cls, index: int) -> Choice:
        if isinstance(index, bool) or not 0 <= index < len(CHOICE_LETTERS):
            raise ValueError(f"a choice index is 0-{len(CHOICE_LETTERS) - 1}, got {index!r}")
        return cls(CHOICE_LETTERS[index])


def choice_letters(answer: str | None) -> str | None:
    """The option letters `answer` names, sorted and without repeats (`A, C, D` -> `ACD`), or None when
    it names no option (rules in the module docstring). Never raises."""
    if not isinstance(answer, str) or len(answer) > _MAX_LEN:
        return None
    text = _SPACING_RE.sub(" ", _WRAPPER_RE.sub("", answer.translate(_FULL_WIDTH))).strip()
    prefix = _PREFIX_RE.match(text)
    if prefix:
        text = text[prefix.end():]
    text = text.strip().rstrip(".。．").strip()
    if not text:
        return None
    tokens = [t for t in _SEPARATOR_RE.split(text) if t]
    if tokens and all(_LABELS_RE.fullmatch(t) for t in tokens):
        return "".join(sorted({c.upper() for t in tokens for c in t if c.isalpha()}))
    m = _LEADING_LABEL_RE.match(text)
    if m:
        return (m.group(1) or m.group(2)).upper()
    return None
