"""The generated recipe reference: the committed docs page matches the generator, and every key is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mathctl.core.config import valid_keys
from mathctl.reference import ITEM, NAME, ordered_steps, recipe_reference, rows, type_name
from mathctl.worker import STEPS, step_module

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"


def _table(step: str) -> dict[str, tuple[str, str, str]]:
    """key -> (type, default, description) of one step's section, read back from the Markdown."""
    section = recipe_reference().split(f"\n## {step}\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.*?) \| (.*?) \| (.*) \|$", line)
        if match:
            key, kind, default, description = match.groups()
            out[key] = (kind.strip("`").replace("\\|", "|"), default.strip("`"), description)
    return out


def test_committed_reference_is_current():
    assert DOC.is_file(), "docs/recipe-reference.md is missing; run: python -m mathctl.reference > docs/recipe-reference.md"
    assert DOC.read_text() == recipe_reference(), (
        "docs/recipe-reference.md is out of date with the config classes; "
        "run: python -m mathctl.reference > docs/recipe-reference.md")


def test_steps_in_lifecycle_order_and_complete():
    steps = ordered_steps()
    assert sorted(steps) == sorted(STEPS)
    core = [s for s in ("data", "pairs", "sft", "rm", "dpo", "grpo", "mcts", "eval") if s in STEPS]
    assert steps[: len(core)] == core


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_leaf_key_appears(step):
    _, config_cls = step_module(step)
    keys = valid_keys(config_cls)
    leaves = [k for k in keys if not any(other.startswith(k + ".") for other in keys)]
    # the table spells free dict keys and list items as NAME / []; valid_keys leaves them out
    documented = {".".join(p for p in key.replace(ITEM, "").split(".") if p != NAME) for key in _table(step)}
    missing = [leaf for leaf in leaves if leaf not in documented]
    assert not missing, f"{step}: keys missing from the reference: {missing}"
    assert len(_table(step)) == len(rows(config_cls))  # one row per key, none lost to the Markdown


def test_spot_checks():
    sft, mcts, evaluate, grpo = _table("sft"), _table("mcts"), _table("eval"), _table("grpo")
    assert sft["train.lr"][:2] == ("float", "2e-05")
    assert sft["model.path"][1] == "required"
    assert sft["train.max_steps"][:2] == ("int | null", "null")
    assert sft["train.lr_schedule"][:2] == ("constant | linear | cosine", '"linear"')
    assert sft["launch.slurm.setup"][:2] == ("list[str]", "[]")  # a default_factory value
    assert "Peak learning rate" in sft["train.lr"][2]
    assert mcts["search.c_puct"][:2] == ("float", "2.0")
    assert mcts["search.mode"][0] == "mcts | beam | greedy"
    assert grpo["rewards.weights"][:2] == ("dict[str, float]", '{"correctness": 1.0}')
    assert grpo["train.lr"][1] == "1e-06"  # GRPO's own default, not the shared TrainBase one
    assert evaluate["eval.per_task.NAME.n"][:2] == ("int | null", "null")
    assert evaluate["eval.per_task"][0] == "dict[str, TaskSettings]"


def test_type_names():
    from typing import Literal

    assert type_name(int) == "int"
    assert type_name(str | None) == "str | null"
    assert type_name(list[str]) == "list[str]"
    assert type_name(tuple[float, ...]) == "tuple[float, ...]"
    assert type_name(Literal["a", "b", 3]) == "a | b | 3"
