"""Pipeline recipes: stage references, validation and substitution (mathctl/pipeline.py)."""

from __future__ import annotations

import pytest

from mathctl.core.config import load_recipe
from mathctl.core.errors import ConfigError
from mathctl.pipeline import PipelineConfig, substitute


def stages(*items: dict) -> dict:
    return {"stages": list(items)}


def validate(data: dict) -> PipelineConfig:
    return PipelineConfig.model_validate(data)


def test_quickstart_pipeline_recipe_loads_and_refers_only_backwards():
    cfg, name = load_recipe("pipeline", PipelineConfig, "quickstart", [])
    assert name == "quickstart" and [s.step for s in cfg.stages][:3] == ["tiny-model", "synthetic", "synthetic"]
    assert {s.step for s in cfg.stages} >= {"sft", "eval", "grpo", "mcts"}


@pytest.mark.parametrize("data, message", [
    (stages({"name": "a", "step": "sft", "recipe": "quickstart-sft", "overrides": ["model.path={stages.b.final}"]},
            {"name": "b", "step": "tiny-model"}), "not an earlier stage"),
    (stages({"name": "a", "step": "tiny-model"}, {"name": "a", "step": "tiny-model"}), "used twice"),
    (stages({"name": "a", "step": "eval"}), "needs a recipe"),
    (stages({"name": "a b", "step": "tiny-model"}), "pattern"),
    (stages({"name": "a", "step": "train"}), "step"),
    (stages(), "at least one stage"),
])
def test_bad_pipelines_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        validate(data)


def test_substitute_replaces_outputs_of_earlier_stages():
    outputs = {"sft": {"final": "/runs/sft/final", "run_dir": "/runs/sft"}}
    assert substitute("model.path={stages.sft.final}", outputs, "eval") == "model.path=/runs/sft/final"
    assert substitute("x={stages.sft.run_dir}/y", outputs, "eval") == "x=/runs/sft/y"
    with pytest.raises(ConfigError, match="not an output of stage sft"):
        substitute("{stages.sft.prm}", outputs, "eval")
