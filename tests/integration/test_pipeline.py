"""The quickstart pipeline end to end (the README's first command): every stage shows its effect, a
re-run skips finished stages, and `mathctl report` draws readable plots of the finished runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import run_cli


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def stage(summary: dict, name: str) -> dict:
    return next(s for s in summary["stages"] if Path(s["folder"]).name.split("-", 1)[1] == name)


def score(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    (entry,) = summary["tasks"].values()
    return entry


@pytest.mark.slow
def test_quickstart_pipeline_shows_each_stage_effect(quickstart_pipeline):
    run, summary = quickstart_pipeline
    assert [Path(s["folder"]).name for s in summary["stages"]] == [
        "1-model", "2-data", "3-heldout", "4-eval-base", "5-sft", "6-eval-sft", "7-grpo", "8-eval-grpo",
        "9-greedy-search", "10-mcts", "11-eval-final", "12-eval-bon"]
    base, sft, grpo = score(run / "4-eval-base"), score(run / "6-eval-sft"), score(run / "8-eval-grpo")
    assert base["score"] == 0.0 and sft["score"] >= 0.5  # measured: 0 -> 0.855 on the 200 held-out problems
    assert grpo["score"] >= sft["score"] - 0.02
    rewards = [r["reward"] for r in map(json.loads, (run / "7-grpo" / "metrics.jsonl").read_text().splitlines())]
    assert sum(rewards[-10:]) / 10 - sum(rewards[:10]) / 10 >= 0.10  # see test_grpo_cli for the margin
    greedy = json.loads((run / "9-greedy-search" / "summary.json").read_text())
    mcts = json.loads((run / "10-mcts" / "summary.json").read_text())
    assert mcts["rounds"][0]["solve_rate"] > greedy["solve_rate"]  # search above greedy, same policy and problems
    assert len(mcts["rounds"]) == 2 and Path(mcts["prm"]).is_dir()
    bon = score(run / "12-eval-bon")
    assert bon["n"] == 8 and "bon@k" in bon and bon["bon@k"]["8"] >= bon["score"]  # the PPM picks above average
    assert "accuracy" in stage(summary, "eval-sft")["result"] and "->" in stage(summary, "grpo")["result"]
    assert all(s["outputs"]["run_dir"] for s in summary["stages"])

    again = run_cli("pipeline", "--recipe", "quickstart", "--run-dir", str(run), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert all(s["seconds"] is None for s in rerun["stages"]) and rerun["seconds"] < 60
    assert [s["result"] for s in rerun["stages"]] == [s["result"] for s in summary["stages"]]


@pytest.mark.slow
def test_report_draws_readable_plots_of_every_stage(quickstart_pipeline):
    run, _ = quickstart_pipeline
    out = run_cli("report", str(run), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    written = [Path(p) for p in json.loads(out.stdout)["reports"]]
    expected = {"5-sft": ["loss", "lr", "grad_norm"], "7-grpo": ["reward", "completion_len", "lr"],
                "8-eval-grpo": ["eval_accuracy"], "12-eval-bon": ["eval_accuracy"], "10-mcts": ["solve_rate"]}
    for folder, names in expected.items():
        for name in names:
            path = run / folder / "plots" / f"{name}.png"
            assert path in written, path
            width, height = png_size(path)
            assert 500 <= width <= 2000 and 300 <= height <= 1500, (path, width, height)
            assert path.stat().st_size > 10_000  # axes, labels and a curve, not an empty canvas
    report = (run / "report.md").read_text()
    assert "| stage | step | result | folder |" in report and "[5-sft](5-sft/report.md)" in report
    sft_report = (run / "5-sft" / "report.md").read_text()
    assert "![loss](plots/loss.png)" in sft_report and "```yaml" in sft_report
    bad = run_cli("report", str(run / "missing"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
