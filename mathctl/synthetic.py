"""Deterministic arithmetic word problems with step-by-step solutions ending in `\\boxed{answer}`.

They feed the quickstart and the tests (SFT now; GRPO rewards and MCTS later), so a tiny model must
be able to learn them: a handful of sentence templates, small numbers, one sentence per operation.
Problem `i` of seed `s` is the same whatever the count asked for (each draws from its own RNG).

Difficulty knobs: `max_digits` (operand size), `min_ops`/`max_ops` (operations per problem) and
`ops` (which of + - * appear). Intermediate results never go negative.

Two solution formats (the problem and answer are the same in both):
    text  one sentence per step, each ending with its result, then "The answer is \\boxed{N}."
    code  rStar-Math's code-augmented steps: a Python block whose statements end in `<end_of_step>`,
          the last one printing the result and ending in `<end_of_code>`, the interpreter's output as
          `<output>N<end_of_output>`, then `<answer>The answer is \\boxed{N}<end_of_answer>`:

              <code>
              cookies = 7<end_of_step>
              cookies = cookies + 5<end_of_step>
              print(cookies)<end_of_code>
              <output>12<end_of_output>
              <answer>The answer is \\boxed{12}<end_of_answer>

          The model only has to turn each sentence into a statement; the interpreter does the arithmetic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "books", "coins", "stickers", "marbles", "pencils", "cards", "shells", "stamps", "cookies"]

# (problem phrase, solution phrase); {n} is the operand, {name}/{item} the subject.
_ADD = [("{name} buys {n} more {item}.", "After buying {n} more"),
        ("{name} finds {n} more {item}.", "After finding {n} more"),
        ("A friend gives {name} {n} {item}.", "After getting {n} from a friend")]
_SUB = [("{name} gives away {n} {item}.", "After giving away {n}"),
        ("{name} loses {n} {item}.", "After losing {n}"),
        ("{name} sells {n} {item}.", "After selling {n}")]
_MUL = [("Then the number of {item} becomes {n} times as large.", "After growing {n} times"),
        ("{name} then has {n} times as many {item}.", "After having {n} times as many")]


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the generator (mirrored by the recipe's `data.synthetic` section)."""

    num_problems: int = 1000
    seed: int = 0
    max_digits: int = 2
    min_ops: int = 1
    max_ops: int = 2
    ops: str = "+-"
    format: str = "text"  # text | code (see the module docstring)


def make_problem(index: int, spec: SyntheticSpec) -> dict:
    """The `index`-th problem for `spec.seed`: id, problem, solution, answer and its difficulty."""
    rng = random.Random(f"{spec.seed}:{index}")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    high = 10 ** spec.max_digits - 1
    value = rng.randint(1, high)
    num_ops = rng.randint(spec.min_ops, spec.max_ops)
    problem = [f"{name} has {value} {item}."]
    solution = [f"{name} starts with {value} {item}."]
    code = [f"<code>\n{item} = {value}<end_of_step>"]
    for _ in range(num_ops):
        choices = [op for op in spec.ops if op != "-" or value > 1]
        op = rng.choice(choices)
        if op == "+":
            n = rng.randint(1, high)
            ask, tell = rng.choice(_ADD)
            result, expr = value + n, f"{value} + {n}"
        elif op == "-":
            n = rng.randint(1, min(value - 1, high))
            ask, tell = rng.choice(_SUB)
            result, expr = value - n, f"{value} - {n}"
        else:
            n = rng.randint(2, 4 if spec.max_digits <= 1 else 9)
            ask, tell = rng.choice(_MUL)
            result, expr = value * n, f"{value} * {n}"
        fields = {"name": name, "item": item, "n": n}
        problem.append(ask.format(**fields))
        solution.append(f"{tell.format(**fields)}, {name} has {expr} = {result}")
        code.append(f"\n{item} = {item} {op} {n}<end_of_step>")
        value = result
    problem.append(f"How many {item} does {name} have now?")
    solution.append(f"The answer is \\boxed{{{value}}}.")
    if spec.format == "code":
        code.append(f"\nprint({item})<end_of_code>\n<output>{value}<end_of_output>")
        code.append(f"\n<answer>The answer is \\boxed{{{value}}}<end_of_answer>")
        text = "".join(code)
    elif spec.format == "text":
        text = "\n".join(solution)
    else:
        raise ValueError(f"unknown solution format {spec.format!r}; use text or code")
    return {
        "id": f"synthetic-{spec.seed}-{index:07d}",
        "problem": " ".join(problem),
        "solution": text,
        "answer": str(value),
        "difficulty": {"max_digits": spec.max_digits, "num_ops": num_ops},
    }


def generate(spec: SyntheticSpec, start: int = 0) -> list[dict]:
    """Problems `start .. start + spec.num_problems - 1`."""
    return [make_problem(i, spec) for i in range(start, start + spec.num_problems)]


def tokenizer_corpus(num_problems: int = 2000) -> list[str]:
    """Text a tiny tokenizer is trained on: synthetic problems plus common math and LaTeX fragments."""
    texts = []
    for spec in (SyntheticSpec(num_problems=num_problems, ops="+-*", max_ops=3),
                 SyntheticSpec(num_problems=num_problems // 4, seed=1, max_digits=3, ops="+-*")):
        for row in generate(spec):
            texts.append(row["problem"])
            texts.append(row["solution"])
    texts += [
        "Let's think step by step and output the final answer within \\boxed{}.",
        "\\frac{1}{2} \\sqrt{2} \\pi \\cdot \\times \\left( \\right) x^2 + y^2 = z^2 \\le \\ge \\neq",
        "The final answer is $\\boxed{42}$. Final Answer: The final answer is 7. I hope it is correct.",
        "#### 72 Question: Answer: Solve the following math problem.",
        "print(x) def solve(): return result import math for i in range(10): x = x + i",
        "system user assistant You are a helpful math assistant.",
    ] * 20
    return texts
