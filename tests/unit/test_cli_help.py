"""Every command's help reads well: it runs, names an example, and shell completion offers recipes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = [["sft"], ["rm"], ["grpo"], ["mcts-sample"], ["pipeline"], ["report"], ["tiny-model"], ["convert-ckpt"],
            ["grade"], ["eval"], ["data", "synthetic"], ["data", "prepare"], ["data", "decontaminate"]]


def mathctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathctl", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=120)


def test_top_level_help_lists_every_command_and_completion():
    out = mathctl("--help")
    assert out.returncode == 0
    for name in ("sft", "rm", "grpo", "mcts-sample", "pipeline", "report", "convert-ckpt", "eval", "data"):
        assert name in out.stdout
    text = " ".join(out.stdout.split())
    assert "--install-completion" in text and "mathctl pipeline --recipe quickstart" in text


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_command_help_has_an_example(command):
    out = mathctl(*command, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert f"mathctl {' '.join(command)} " in text.split("Usage:", 1)[1].split("Options:")[0].replace(
        f"Usage: mathctl {' '.join(command)}", ""), text[:400]


def test_recipe_completion_lists_the_commands_shipped_recipes():
    env = {"_MATHCTL_COMPLETE": "complete_bash", "COMP_WORDS": "mathctl mcts-sample --recipe quickstart-m",
           "COMP_CWORD": "3"}
    out = mathctl(env=env)
    assert out.returncode == 0
    assert out.stdout.split() == ["quickstart-mcts", "quickstart-mcts-text"]


@pytest.mark.parametrize("args", [["sft", "--foo"], ["mcts-sample", "--rounds", "0"], ["eval", "math500", "--n", "x"]])
def test_usage_errors_exit_2_without_a_traceback(args):
    out = mathctl(*args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Error:" in out.stderr
