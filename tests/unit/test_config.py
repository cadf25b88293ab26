"""Recipes: overrides, typed validation, helpful errors, and every shipped recipe validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathctl.core.config import RECIPES_DIR, load_recipe, parse_override
from mathctl.core.errors import ConfigError
from mathctl.sft import SFTConfig
from mathctl.worker import STEPS, step_module


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("train.lr=1e-5", ["train", "lr"], 1e-5),  # YAML 1.1 reads 1e-5 as a string; we mean a float
        ("train.lr=3.0e-3", ["train", "lr"], 3e-3),
        ("launch.num_processes=2", ["launch", "num_processes"], 2),
        ("train.packing=false", ["train", "packing"], False),
        ("lora.target_modules=[q_proj, v_proj]", ["lora", "target_modules"], ["q_proj", "v_proj"]),
        ("model.path=org/name", ["model", "path"], "org/name"),
        ("output.name=", ["output", "name"], ""),
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_override_without_equals_is_a_user_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.lr")


def test_precedence_defaults_recipe_override():
    cfg, name = load_recipe("sft", SFTConfig, "quickstart-sft", ["train.lr=0.5"])
    assert name == "quickstart-sft"
    assert cfg.train.lr == 0.5  # override beats the recipe's 3e-3
    assert cfg.train.packing is True  # from the recipe
    assert cfg.train.eps == 1e-8  # schema default


def test_unknown_key_names_key_file_and_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: tiny:qwen2-tiny}\ndata: {source: synthetic}\ntrain: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe("sft", SFTConfig, str(recipe), [])
    message = info.value.message
    assert "train.lrr" in message and str(recipe) in message and "did you mean train.lr?" in message


def test_unknown_key_from_override_says_override():
    with pytest.raises(ConfigError) as info:
        load_recipe("sft", SFTConfig, "quickstart-sft", ["train.micro_batch=4"])
    assert "override" in info.value.message and "train.micro_batch_size" in info.value.message


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as info:
        load_recipe("sft", SFTConfig, "quickstart-sft", ["train.max_steps=many"])
    assert "train.max_steps" in info.value.message and "'many'" in info.value.message


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_recipe("sft", SFTConfig, "quickstart-sft", ["train.lrr=1", "launch.num_processes=zero", "oops=1"])
    message = info.value.message
    assert "3 problems" in message
    assert "train.lrr" in message and "launch.num_processes" in message and "oops" in message


def test_missing_recipe_lists_available():
    with pytest.raises(ConfigError) as info:
        load_recipe("sft", SFTConfig, "quickstart-sf", [])
    assert "quickstart-sft" in info.value.hint


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("sft", SFTConfig, "no/such/recipe.yaml", [])


def test_alias_and_override_together_is_an_error():
    with pytest.raises(ConfigError, match="set twice"):
        load_recipe("sft", SFTConfig, "quickstart-sft", ["model.path=a/b"], aliases={"model.path": "c/d"})


def test_cross_field_check_says_what_to_change():
    with pytest.raises(ConfigError, match="num_processes"):
        load_recipe("sft", SFTConfig, "quickstart-sft", ["launch.num_processes=3", "launch.num_machines=2"])


def test_recipe_for_another_step_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("step: grpo\n")
    with pytest.raises(ConfigError, match="mathctl grpo"):
        load_recipe("sft", SFTConfig, str(recipe), [])


def _shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.rglob("*.yaml"))  # every subfolder, not just the top level


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_validates(path):
    step = path.parent.name
    assert step in STEPS, f"recipe folder {step} names no step"
    _, config_cls = step_module(step)
    cfg, _ = load_recipe(step, config_cls, str(path), [])
    assert cfg.step == step
    # the header comment block says what it is and how to run it
    head = path.read_text().splitlines()[0]
    assert head.startswith("#"), f"{path} must start with a comment block"
    command = {"data": "data prepare", "pairs": "data pairs", "mcts": "mcts-sample"}.get(step, step)
    assert f"mathctl {command} --recipe {path.stem}" in path.read_text()


def test_shipped_recipes_are_found_by_name():
    assert len(_shipped_recipes()) >= 5
