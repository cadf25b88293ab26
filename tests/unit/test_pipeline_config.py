"""Pipeline recipes: stage references, validation and substitution (mathctl/pipeline.py)."""

from __future__ import annotations

import pytest

from mathctl.core.config import load_recipe
from mathctl.core.errors import ConfigError
from mathctl.pipeline import PipelineConfig, _unset_var, run_stage, substitute


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
    (stages({"name": "a", "step": "tiny-model", "args": {"preset": "{vars.size}"}}), "vars do not define"),
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


def test_vars_are_set_by_overrides_and_an_empty_one_drops_its_override():
    cfg, _ = load_recipe("pipeline", PipelineConfig, "smollm2-gsm8k", ["vars.problems=12", "vars.benchmarks=/data/b"])
    assert [s.step for s in cfg.stages] == ["model", "data", "data", "eval", "sft", "eval", "grpo", "eval"]
    assert cfg.vars["problems"] == 12 and cfg.vars["model"] is None
    assert substitute("eval.limit={vars.problems}", {}, "e", cfg.vars) == "eval.limit=12"
    assert not _unset_var("eval.data_dir={vars.benchmarks}", cfg.vars)
    # an empty var: `key={vars.X}` is left out, so the recipe's or mathctl.yaml's value stands
    assert _unset_var("model.path={vars.model}", cfg.vars) and not _unset_var("model.path=x{vars.model}", cfg.vars)
    assert substitute("x{vars.model}y", {}, "e", cfg.vars) == "xy"


def test_model_and_data_stages(tiny_model, tmp_path):
    from mathctl.pipeline import Stage

    done = run_stage(Stage(name="m", step="model"), tmp_path / "1-m", [], {"path": str(tiny_model), "package": "x"})
    assert done == {"status": "completed", "path": str(tiny_model), "source": str(tiny_model)}
    with pytest.raises(ConfigError, match="no model given"):
        run_stage(Stage(name="m", step="model"), tmp_path / "2-m", [], {"path": ""})
    with pytest.raises(ConfigError, match="does not exist"):
        run_stage(Stage(name="m", step="model"), tmp_path / "3-m", [], {"path": str(tmp_path / "none.gguf")})
    rl = run_stage(Stage(name="d", step="data"), tmp_path / "4-d", [],
                   {"source": "synthetic", "kind": "rl", "synthetic_rows": 20, "input": ""})
    assert rl["rows"] == 20 and rl["kind"] == "rl" and (tmp_path / "4-d" / "data" / "stats.json").is_file()
    # done once: a second call reads the summary back
    assert run_stage(Stage(name="d", step="data"), tmp_path / "4-d", [], {"source": "nothing"}) == rl
    with pytest.raises(ConfigError, match="its own folder"):
        run_stage(Stage(name="d", step="data"), tmp_path / "5-d", [], {"source": "synthetic", "out": "x"})
