"""`tracking.report_to`: a run's metrics.jsonl records reach tensorboard (read back from its event files) and
wandb (an offline run folder, as when nobody is logged in), with the config attached; a tracker that is not
installed is exit 2 before a run folder exists."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import quick_overrides

from mathctl.tracking import flat_config, scalars

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_SILENT="true")  # nobody logged in: wandb goes offline
    return env


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathctl", *args], capture_output=True, text=True, env=env, timeout=600)


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_records_become_scalars():
    step, values = scalars({"step": 3, "loss": 1.5, "lr": 1e-5, "pass@k": {"1": 0.5, "4": 0.75}, "note": "x",
                            "flag": True, "bad": float("nan"), "sizes": [1, 2]})
    assert step == 3 and values == {"loss": 1.5, "lr": 1e-5, "pass@k/1": 0.5, "pass@k/4": 0.75, "flag": 1.0}
    assert scalars({"task": "gsm8k", "score": 0.25}) == (None, {"gsm8k/score": 0.25})
    assert scalars({"round": 2, "solve_rate": 0.5}) == (2, {"solve_rate": 0.5})
    assert flat_config({"train": {"lr": 1e-5, "betas": [0.9, 0.95]}, "lora": {}}) == {
        "train.lr": 1e-5, "train.betas": [0.9, 0.95], "lora": {}}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("tensorboard") is None,
                    reason="the dev extra installs tensorboard and wandb")
def test_sft_metrics_reach_tensorboard_and_offline_wandb(tiny_model, tmp_path):
    folder = tmp_path / "sft"
    proc = _run("sft", *quick_overrides(tiny_model, "output.plots=false", "output.save_every_steps=null",
                                        "tracking.report_to=[tensorboard,wandb]", "tracking.run_name=tiny-sft"),
                "--run-dir", str(folder), env=_offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    board = _tensorboard_scalars(folder / "tensorboard")
    for key in ("loss", "lr", "grad_norm", "eval_loss"):
        want = [(r["step"], r[key]) for r in records if key in r]
        assert want and [(s, pytest.approx(v, rel=1e-6)) for s, v in want] == board[key], key

    meta = json.loads((folder / "meta.json").read_text())
    run_id = meta["tracking"]["wandb_id"]
    runs = list((folder / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((folder / "wandb").iterdir())
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    # history values are stored as their JSON text: every logged number is in the offline run
    for record in records:
        for key in ("loss", "eval_loss"):
            if key in record:
                assert json.dumps(record[key]).encode() in data, (key, record)
    assert b"tiny-sft" in data and b"quickstart" in data  # the run name and the config (its data section)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the dev extra installs tensorboard")
@pytest.mark.skipif(not (BENCH / "gsm8k" / "test.jsonl").is_file(), reason="../shared/data beside the checkout")
def test_eval_scores_reach_tensorboard_per_task(tiny_model, tmp_path):
    folder = tmp_path / "eval"
    proc = _run("eval", "gsm8k,math500", "--model", str(tiny_model), "--data-dir", str(BENCH), "--limit", "2",
                "--max-new-tokens", "4", "tracking.report_to=[tensorboard]", "--run-dir", str(folder), "--json",
                env=_offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    board = _tensorboard_scalars(folder / "tensorboard")
    for task in ("gsm8k", "math500"):
        assert board[f"{task}/score"] == [(0, pytest.approx(summary["tasks"][task]["score"]))]
        assert f"{task}/pass@k/1" in board and board[f"{task}/problems"] == [(0, 2.0)]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the dev extra installs tensorboard")
def test_dpo_metrics_reach_tensorboard(tiny_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "chosen": f"\\boxed{{{2 * i}}}",
                                         "rejected": f"\\boxed{{{2 * i + 1}}}"}) + "\n" for i in range(16)))
    folder = tmp_path / "dpo"
    proc = _run("dpo", "--recipe", "quickstart-dpo", f"model.path={tiny_model}", f"data.source={pairs}",
                "data.eval_fraction=0.25", "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every_steps=2",
                "output.plots=false", "output.save_every_steps=null", "tracking.report_to=[tensorboard]",
                "--run-dir", str(folder), env=_offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    board = _tensorboard_scalars(folder / "tensorboard")
    for key in ("loss", "preference_loss", "rewards/margin", "eval_accuracy", "eval_likelihood_accuracy"):
        want = [(r["step"], r[key]) for r in records if key in r]
        assert want and [(s, pytest.approx(v, rel=1e-6, abs=1e-12)) for s, v in want] == board[key], key


@pytest.mark.skipif(importlib.util.find_spec("trackio") is not None, reason="trackio is installed here")
def test_missing_tracker_is_exit_2_before_a_run_folder(tiny_model, tmp_path):
    folder = tmp_path / "sft"
    proc = _run("sft", *quick_overrides(tiny_model, "tracking.report_to=[trackio]"), "--run-dir", str(folder),
                env=_offline_env(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: tracking.report_to asks for trackio, which is not installed" in proc.stderr
    assert "hint: pip install trackio" in proc.stderr and not folder.exists()
