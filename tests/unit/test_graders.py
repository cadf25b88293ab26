"""`eval.grader` / `rewards.grader`: mathctl's grader by default, math-verify by name (optional)."""

from __future__ import annotations

import importlib.util

import pytest

from mathctl.core.config import validate
from mathctl.core.errors import ConfigError
from mathctl.evaluate import EvalConfig
from mathctl.grading.graders import GRADERS, grade_with, grader_version, require_grader
from mathctl.rewards import RewardsConfig

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def test_default_grader_is_mathctl():
    assert EvalConfig.model_validate({"model": {"path": "x"}}).eval.grader == "mathctl"
    assert RewardsConfig().grader == "mathctl"
    assert GRADERS == ("mathctl", "math-verify")
    assert grader_version("mathctl")


def test_grade_with_mathctl_is_grade_batch():
    grades = grade_with("mathctl", ["so \\boxed{0.5}", "the answer is 3"], ["\\frac{1}{2}", "4"])
    assert [g.correct for g in grades] == [True, False]


def test_unknown_grader():
    with pytest.raises(ConfigError, match="unknown grader"):
        require_grader("sympy")


@pytest.mark.skipif(HAS_MATH_VERIFY, reason="math-verify is installed here")
def test_math_verify_missing_is_a_config_error_with_a_hint():
    with pytest.raises(ConfigError) as info:
        require_grader("math-verify")
    assert "pip install math-verify" in info.value.hint
    with pytest.raises(ConfigError, match="pip install math-verify"):
        validate(EvalConfig, {"model": {"path": "x"}, "eval": {"grader": "math-verify"}}, source="recipe")
    with pytest.raises(ConfigError, match="pip install math-verify"):
        validate(RewardsConfig, {"grader": "math-verify"}, source="recipe")


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="needs math-verify")
def test_math_verify_grades():
    grades = grade_with("math-verify", ["so \\boxed{0.5}", "so \\boxed{3}"], ["\\frac{1}{2}", "4"])
    assert [g.correct for g in grades] == [True, False]
    assert grader_version("math-verify") != "unknown"


def test_summary_records_the_grader(tmp_path):
    from mathctl.core.rundir import RunDir
    from mathctl.evaluate import write_summary

    cfg = EvalConfig.model_validate({"model": {"path": "x"}, "eval": {"tasks": ["gsm8k"]}})
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir(parents=True)
    summary = write_summary(cfg, run_dir, ["gsm8k"], prompt_format="raw", backend="hf", chat_template_digest=None)
    assert summary["grader"]["name"] == "mathctl" and summary["grader"]["version"]
