"""Reward functions for GRPO, built on `grading/` so a reward and the eval metric cannot drift apart.

Every reward is a batch function `fn(prompts, completions, golds) -> list[float]`. A recipe names
them with weights (`rewards.weights: {correctness: 1.0, boxed_format: 0.1}`); `RewardsConfig.compute`
returns the weighted sum per completion and each function's values (GRPO logs them separately).
A user function can be named as `package.module:function` with the same signature.

Built-in rewards:
    correctness     1.0 when the extracted answer equals the gold answer (grading.grade), else 0.0.
    boxed_format    1.0 when the response ends its reasoning with a non-empty `\\boxed{...}`, else 0.0.
    step_format     Math Mind's step format, scored 0..1 as the share of four checks passed:
                    `<begin_steps>` opens the response; steps `<STEP 1>...</STEP>`, `<STEP 2>...`
                    numbered from 1 without gaps and all closed; at least one `@@@@ a*b = c @@@@`
                    equation; a final `#### answer` after the last step.
    stepwise        The share of `@@@@ lhs = rhs @@@@` equations that are arithmetically true *and*
                    chain towards the answer: walking back from the final answer, an equation counts
                    when it is true and its result is the answer or an operand of a counted later
                    equation. 0.0 when there is no equation.
    length_penalty  0 up to `length_soft_chars` characters, then falling linearly to -1 at
                    `length_hard_chars` (DAPO-style overlong shaping, in characters so it needs no
                    tokenizer); use with a small weight.
"""

from __future__ import annotations

import ast
import importlib
import math
import operator
import re
from collections.abc import Callable, Sequence

from pydantic import Field, field_validator

from mathctl.core.config import Strict
from mathctl.core.errors import ConfigError
from mathctl.grading.extract import extract_answer, extract_boxed_all
from mathctl.grading.grade import Gold, grade_batch
from mathctl.grading.graders import GraderName

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Gold]], list[float]]


# --- correctness and format -----------------------------------------------------------------
def correctness(prompts: Sequence[str], completions: Sequence[str], golds: Sequence[Gold], *,
                timeout_s: float = 1.0, grader: str = "mathctl") -> list[float]:
    if grader != "mathctl":
        from mathctl.grading.graders import grade_with

        return [1.0 if g.correct else 0.0 for g in grade_with(grader, completions, golds, timeout_s=timeout_s)]
    return [1.0 if g.correct else 0.0 for g in grade_batch(completions, golds, timeout_s=timeout_s)]


def no_answer_count(completions: Sequence[str]) -> int:
    """Completions in which mathctl's extraction finds no answer (GRPO logs the fraction per step: a reward
    that never sees an answer cannot teach one)."""
    return sum(1 for text in completions if extract_answer(text) is None)


def boxed_format(prompts: Sequence[str], completions: Sequence[str], golds: Sequence[Gold]) -> list[float]:
    scores = []
    for text in completions:
        boxes = extract_boxed_all(text)
        scores.append(1.0 if boxes and boxes[-1].strip() else 0.0)
    return scores


_STEP_OPEN = re.compile(r"<STEP\s+(\d+)>")
_EQUATION = re.compile(r"@@@@(.*?)@@@@", re.DOTALL)
_FINAL = re.compile(r"####\s*(\S[^\n]*)\s*$")


def step_format(prompts: Sequence[str], completions: Sequence[str], golds: Sequence[Gold]) -> list[float]:
    scores = []
    for text in completions:
        body = text.strip()
        numbers = [int(n) for n in _STEP_OPEN.findall(body)]
        last_close = body.rfind("</STEP>")
        checks = [
            body.startswith("<begin_steps>"),
            bool(numbers) and numbers == list(range(1, len(numbers) + 1)) and body.count("</STEP>") == len(numbers),
            bool(_EQUATION.search(body)),
            last_close >= 0 and bool(_FINAL.search(body[last_close:])),
        ]
        scores.append(sum(checks) / len(checks))
    return scores


# --- stepwise: true equations that lead to the answer ---------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TIMES = re.compile(r"(?<=[\d)])\s*[x×]\s*(?=[\d(])")  # 3 x 4, 3×4 (an x between numbers only)


def safe_arithmetic(expression: str) -> float | None:
    """Value of a plain arithmetic expression (numbers, + - * / // % **, parentheses), or None.

    Bounded: exponents above 64 and results beyond 1e100 are refused, so no input can hang it.
    """
    text = _TIMES.sub("*", expression.replace(",", "").replace("$", "")).replace("^", "**").replace("÷", "/").strip()
    if not text or len(text) > 200:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("exponent too large")
            result = _BINARY[type(node.op)](left, right)
            if abs(result) > 1e100:
                raise ValueError("too large")
            return result
        raise ValueError("not arithmetic")

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def stepwise(prompts: Sequence[str], completions: Sequence[str], golds: Sequence[Gold]) -> list[float]:
    scores = []
    for text in completions:
        equations = []
        for raw in _EQUATION.findall(text):
            if raw.count("=") != 1:
                equations.append(None)
                continue
            lhs, rhs = raw.split("=")
            left, right = safe_arithmetic(lhs), safe_arithmetic(rhs)
            true = left is not None and right is not None and _close(left, right)
            operands = [float(n) for n in _NUMBER.findall(lhs.replace(",", ""))]
            equations.append((right, operands) if true else None)
        if not equations:
            scores.append(0.0)
            continue
        final = _FINAL.search(text.strip())
        answer = safe_arithmetic(final.group(1)) if final else None
        needed = [answer] if answer is not None else []
        counted = 0
        for item in reversed(equations):
            if item is None:
                continue
            result, operands = item
            if any(_close(result, n) for n in needed):
                counted += 1
                needed += operands
        scores.append(counted / len(equations))
    return scores


# --- registry and combination -----------------------------------------------------------------
BUILTIN: dict[str, RewardFn] = {
    "correctness": correctness,
    "boxed_format": boxed_format,
    "step_format": step_format,
    "stepwise": stepwise,
}
LENGTH_PENALTY = "length_penalty"


def get_reward(name: str) -> RewardFn:
    """A built-in reward by name, or `package.module:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import reward {name}: {exc}", hint="check the module path and function name") from None
        if not callable(fn):
            raise ConfigError(f"reward {name} is not callable", hint="point at a function (prompts, completions, golds)")
        return fn
    available = ", ".join([*BUILTIN, LENGTH_PENALTY])
    raise ConfigError(f"unknown reward '{name}'; available: {available}",
                      hint="or name your own function as package.module:function")


class RewardsConfig(Strict):
    """Which rewards GRPO sums, with what weights."""

    weights: dict[str, float] = Field(default_factory=lambda: {"correctness": 1.0},
                                      description="Reward name -> weight; the total is the weighted sum.")
    timeout_s: float = Field(1.0, gt=0, description="Time limit of each symbolic equivalence check (correctness).")
    grader: GraderName = Field(
        "mathctl", description="Who decides `correctness`: mathctl's grader, or math-verify (an optional "
        "dependency: pip install math-verify) to reproduce peers' reward setups.")
    length_soft_chars: int = Field(4000, ge=1, description="length_penalty: no penalty up to this many characters.")
    length_hard_chars: int = Field(8000, ge=2, description="length_penalty: -1 at and beyond this many characters.")

    @field_validator("weights")
    @classmethod
    def _known(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("rewards.weights is empty; name at least one reward, e.g. {correctness: 1.0}")
        for name in weights:
            if name != LENGTH_PENALTY:
                try:
                    get_reward(name)
                except ConfigError as exc:  # reported with the other recipe problems
                    raise ValueError(exc.message) from None
        return weights

    def compute(self, prompts: Sequence[str], completions: Sequence[str],
                golds: Sequence[Gold]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion, {reward name: its unweighted values})."""
        per_function: dict[str, list[float]] = {}
        for name in self.weights:
            if name == LENGTH_PENALTY:
                per_function[name] = length_penalty(completions, self.length_soft_chars, self.length_hard_chars)
            elif name == "correctness":
                per_function[name] = correctness(prompts, completions, golds, timeout_s=self.timeout_s,
                                                 grader=self.grader)
            else:
                values = [float(v) for v in get_reward(name)(prompts, completions, golds)]
                if len(values) != len(completions):
                    raise ConfigError(f"reward {name} returned {len(values)} values for {len(completions)} completions",
                                      hint="a reward must return one float per completion")
                per_function[name] = values
        totals = [sum(self.weights[name] * per_function[name][i] for name in self.weights) for i in range(len(completions))]
        return totals, per_function


def length_penalty(completions: Sequence[str], soft: int, hard: int) -> list[float]:
    span = max(1, hard - soft)
    return [-min(1.0, max(0, len(text) - soft) / span) for text in completions]

