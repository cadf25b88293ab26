"""Every command's help reads well: it runs, names an example, and shell completion offers recipes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = [["sft"], ["rm"], ["dpo"], ["grpo"], ["mcts-sample"], ["pipeline"], ["report"], ["tiny-model"],
            ["convert-ckpt"], ["grade"], ["eval"], ["data", "synthetic"], ["data", "prepare"], ["data", "pairs"],
            ["data", "decontaminate"]]


def mathctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathctl", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=120)


def test_top_level_help_lists_every_command_and_completion():
    out = mathctl("--help")
    assert out.returncode == 0
    for name in ("sft", "rm", "dpo", "grpo", "mcts-sample", "pipeline", "report", "convert-ckpt", "eval", "data"):
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


@pytest.mark.parametrize("args, needle", [
    (["sft", "--foo"], "No such option: --foo"), (["mcts-sample", "--rounds", "0"], "--rounds"),
    (["eval", "math500", "--n", "x"], "--n"), (["eval", "math500", "--n", "0"], "--n"),
    (["convert-ckpt"], "Missing argument")])
def test_usage_errors_are_one_error_line_and_a_hint(args, needle):
    """click's own usage errors read like every other user error: `error:` and `hint:`, exit 2."""
    out = mathctl(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert lines[1] == f"hint: `mathctl {args[0]} --help` lists its options and arguments"


def test_the_missions_command_lines_work_as_written(tmp_path):
    """`mathctl mcts-sample --rounds 4` takes rStar-Math's recipe; `mathctl eval aime2024` takes its model from
    MATHCTL_MODEL or ./mathctl.yaml (and otherwise says where to give one); other tools' task names work."""
    import json
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])  # this checkout's mathctl, run from another folder
    env = {k: v for k, v in os.environ.items() if k != "MATHCTL_MODEL"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    out = subprocess.run([sys.executable, "-m", "mathctl", "mcts-sample", "--rounds", "4", "--dry-run", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    recipe = json.loads(out.stdout)["recipe"]
    assert recipe["rounds"]["count"] == 4 and recipe["rounds"]["sft_recipe"] == "rstar-sft"
    assert "recipe: rstar-math" in out.stderr

    def eval_dry(*args, **extra):
        return subprocess.run([sys.executable, "-m", "mathctl", "eval", *args, "--dry-run", "--json"],
                              capture_output=True, text=True, env={**env, **extra}, cwd=tmp_path, timeout=120)

    none = eval_dry("aime2024")
    assert none.returncode == 2 and "MATHCTL_MODEL" in none.stderr and "mathctl.yaml" in none.stderr
    got = json.loads(eval_dry("aime2024", MATHCTL_MODEL="org/from-env").stdout)["recipe"]
    assert got["model"]["path"] == "org/from-env" and got["eval"]["tasks"] == ["aime2024"]
    (tmp_path / "mathctl.yaml").write_text("model: org/from-file\ndata_dir: /data/bench\noutput_root: /scratch/runs\n")
    got = json.loads(eval_dry("math_500,gsm8k_cot,lighteval|aime24|0|0").stdout)["recipe"]
    assert got["model"]["path"] == "org/from-file" and got["eval"]["data_dir"] == "/data/bench"
    assert got["output"]["root"] == "/scratch/runs" and got["eval"]["tasks"] == ["math_500", "gsm8k_cot", "lighteval|aime24|0|0"]
    assert json.loads(eval_dry("aime2024", MATHCTL_MODEL="org/env-wins").stdout)["recipe"]["model"]["path"] == "org/env-wins"
    flag = json.loads(eval_dry("aime2024", "--model", "org/flag").stdout)["recipe"]
    assert flag["model"]["path"] == "org/flag"
    (tmp_path / "mathctl.yaml").write_text("modle: x\n")
    bad = eval_dry("aime2024", "--model", "org/flag")
    assert bad.returncode == 2 and "unknown key(s) modle" in bad.stderr and "Traceback" not in bad.stderr
