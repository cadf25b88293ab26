"""The recipe reference, generated from the config classes: `python -m mathctl.reference > docs/recipe-reference.md`.

Every step in `mathctl.worker.STEPS` gets a section with one table row per dotted key: its type, its
default and the `Field` description, so help text is written once, on the field (STYLE.md section 2).
Nested `Strict` sections are walked, also inside `X | None`, `list[X]` and `dict[str, X]`; a dict of
sections shows its free key as `NAME` (`eval.per_task.NAME.n`), a list of sections as `[]`.
`tests/unit/test_reference.py` fails when docs/recipe-reference.md differs from this output.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel

LIFECYCLE = ("data", "pairs", "sft", "rm", "dpo", "grpo", "mcts", "eval")
COMMANDS = {"data": "mathctl data prepare", "pairs": "mathctl data pairs", "mcts": "mathctl mcts-sample"}
GUIDES = {"data": "data.md", "pairs": "dpo.md", "sft": "sft.md", "rm": "rm.md", "dpo": "dpo.md", "grpo": "grpo.md",
          "mcts": "mcts-sample.md", "eval": "eval.md", "pipeline": "pipeline-and-reports.md"}  # docs/ pages; other steps get none
NAME, ITEM = "NAME", "[]"  # placeholder segments for dict keys and list items


def ordered_steps() -> list[str]:
    """The steps of `mathctl.worker.STEPS`: lifecycle order first, then any others as they are listed."""
    from mathctl.worker import STEPS

    return [s for s in LIFECYCLE if s in STEPS] + [s for s in STEPS if s not in LIFECYCLE]


def type_name(annotation: Any) -> str:
    """A readable type: `int`, `str | null`, `list[str]`, Literal choices as `a | b | c`."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(a if isinstance(a, str) else json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{base}[{inner}]" if inner else base
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _submodels(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """Models reachable through an annotation, each with the key segment that leads into it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict and len(args) == 2:
        return [(NAME + "." + seg if seg else NAME, m) for seg, m in _submodels(args[1])]
    if origin in (list, tuple, set, frozenset):
        return [(ITEM + "." + seg if seg else ITEM, m) for a in args for seg, m in _submodels(a)]
    return [pair for a in args for pair in _submodels(a)]


def default_text(field: Any) -> str:
    """JSON-style default; `required` when there is none; default_factory values are called and shown."""
    if field.is_required():
        return "required"
    try:
        value = field.get_default(call_default_factory=True)
    except TypeError:  # a factory that needs the validated data
        return "(computed)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, ensure_ascii=False, default=str)


def rows(model: type[BaseModel], prefix: str = "", seen: tuple[type, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key of `model`; plain sections are walked, not listed."""
    out: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        plain_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if not plain_section:
            out.append((key, type_name(annotation), default_text(field), field.description or ""))
        for segment, sub in _submodels(annotation):
            if sub not in seen:  # a self-referencing model is listed once
                joint = "" if segment.startswith(ITEM) else "."  # stages[].name, eval.per_task.NAME.n
                out.extend(rows(sub, f"{key}{joint}{segment}." if segment else f"{key}.", (*seen, model)))
    return out


def _cell(text: str, code: bool = False) -> str:
    text = " ".join(text.split("\n")).replace("|", "\\|")
    return f"`{text}`" if code and text and "`" not in text else text


def step_section(step: str) -> str:
    """The Markdown section of one step: command, guide, shipped recipes and the key table."""
    from mathctl.core.config import available_recipes
    from mathctl.worker import step_module

    _, config_cls = step_module(step)
    command = COMMANDS.get(step, f"mathctl {step}")
    guide = f" Guide: [{GUIDES[step]}]({GUIDES[step]})." if step in GUIDES else ""
    recipes = ", ".join(f"`{r}`" for r in available_recipes(step)) or "none"
    lines = [f"## {step}", "", f"`{command} --recipe NAME_OR_PATH [key=value ...]`.{guide}", "",
             f"Shipped recipes (`recipes/{step}/`): {recipes}.", "",
             "| key | type | default | description |", "|---|---|---|---|"]
    for key, kind, default, description in rows(config_cls):
        lines.append(f"| {_cell(key, True)} | {_cell(kind, True)} | {_cell(default, True)} | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def recipe_reference() -> str:
    """The whole reference as Markdown (what docs/recipe-reference.md holds)."""
    steps = ordered_steps()
    head = [
        "# Recipe reference",
        "",
        "Generated from the config classes by `python -m mathctl.reference > docs/recipe-reference.md`;",
        "do not edit by hand (a unit test compares this file with the generator's output).",
        "",
        "Every key can be set in a recipe file or as a dotted override on the command line",
        "(`train.lr=1e-5`, `eval.tasks=[math500,gsm8k]`). Precedence: the defaults below < the recipe file <",
        "overrides. `required` keys have no default. In a key, `NAME` is a free name (a task, say:",
        "`eval.per_task.aime2024.n=32`) and `[]` an item of a list. Types: `null` means the key may be",
        "left empty; `a | b | c` lists the accepted choices. `step` names the command a recipe belongs to.",
        "",
        "Steps: " + ", ".join(f"[{s}](#{s})" for s in steps) + ".",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(step_section(s) for s in steps)


def main() -> int:
    """Print the reference on stdout."""
    import sys

    sys.stdout.write(recipe_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
