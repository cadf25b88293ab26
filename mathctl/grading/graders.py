"""Which grader decides: mathctl's own (`grade_batch`) or math-verify, chosen by name.

`eval.grader` and `rewards.grader` take one of `GRADERS`. math-verify is an optional dependency
(`pip install math-verify`, or the `math-verify` extra), there so that users can reproduce numbers that
peers report with it; it is called as NeMo RL and TRL call it: the gold wrapped in `$\\boxed{...}$`, the
whole response parsed, `verify(gold, answer)`, an exception counting as wrong. Its verdicts come back as
`Grade`s with `reason` "math-verify" (or "no_answer" when it extracted nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Annotated, Literal

from pydantic import AfterValidator

from mathctl.core.errors import ConfigError
from mathctl.grading.grade import Gold, Grade, gold_strings, grade_batch

GRADERS = ("mathctl", "math-verify")


def grader_version(name: str) -> str:
    """The installed version of grader `name` (mathctl's own is the package version)."""
    dist = "mathctl" if name == "mathctl" else "math-verify"
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def require_grader(name: str) -> None:
    """Raise a ConfigError when grader `name` is unknown or not installed."""
    if name not in GRADERS:
        raise ConfigError(f"unknown grader {name!r}; available: {', '.join(GRADERS)}")
    if name == "math-verify":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ConfigError("grader 'math-verify' is not installed",
                              hint="pip install math-verify  (or pip install 'mathctl[math-verify]'), "
                                   "or set the grader to mathctl") from None


def check_grader_installed(name: str) -> str:
    """For config validators: `name` back, or ValueError (reported with the recipe's other problems)."""
    try:
        require_grader(name)
    except ConfigError as exc:
        raise ValueError(f"{exc.message}; {exc.hint}") from None
    return name


# The config type of `eval.grader` and `rewards.grader`: one of GRADERS, and installed (checked when the recipe
# is validated, so a missing math-verify is reported with the recipe's other problems, before any model loads).
GraderName = Annotated[Literal["mathctl", "math-verify"], AfterValidator(check_grader_installed)]


def grade_with(grader: str, responses: Sequence[str], golds: Sequence[Gold], *, timeout_s: float = 1.0,
               workers: int | None = None) -> list[Grade]:
    """`grade_batch` with the named grader."""
    if grader == "mathctl":
        return grade_batch(responses, golds, timeout_s=timeout_s, workers=workers)
    require_grader(grader)
    from math_verify import parse, verify

    grades = []
    for response, gold in zip(responses, golds, strict=True):
        alternatives = gold_strings(gold)
        try:
            answer = parse(response or "")
        except Exception:  # math-verify raises on some inputs; count as no answer
            answer = []
        ok = False
        for alt in alternatives:
            try:
                ok = bool(verify(parse(f"$\\boxed{{{alt}}}$"), answer))
            except Exception:
                ok = False
            if ok:
                break
        extracted = str(answer[-1]) if answer else None
        grades.append(Grade(ok, extracted, extracted, alternatives[0] if alternatives else "",
                            "math-verify" if answer else "no_answer"))
    return grades
