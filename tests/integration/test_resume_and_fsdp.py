"""Long end-to-end checks: a real SIGKILL and resume, and two FSDP2 processes over gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import quick_overrides
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_run_then_resume_gives_the_same_weights(cli, tiny_model, tmp_path):
    """fp32 on CPU: kill -9 after the second checkpoint, resume, and end bit-for-bit where an
    uninterrupted run ends (max abs difference <= 1e-6)."""
    # 120 steps, kill after step 10: the run is still far from its end when the signal lands
    args = quick_overrides(tiny_model, "train.max_steps=120", "output.save_every_steps=5", "train.eval_every_steps=20",
                           "output.save_hf_checkpoints=false", "train.lr_schedule=cosine", "train.warmup_steps=4",
                           "data.synthetic.num_problems=240")
    straight = tmp_path / "straight"
    assert cli("sft", *args, "--run-dir", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "mathctl", "sft", *args, "--run-dir", str(killed)],
                               stdout=log, stderr=log, env=dict(os.environ))
    marker = killed / "checkpoints" / "step_000010" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'killed.log').read_text()}"
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the kill came too late to be mid-run"
    assert json.loads((killed / "meta.json").read_text())["status"] == "running"  # killed, never finished

    resumed = cli("sft", "--resume", "--run-dir", str(killed), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 120

    expected = load_file(straight / "final" / "model.safetensors")
    got = load_file(killed / "final" / "model.safetensors")
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    print(f"kill at step >= 10 of 120, resumed from step {summary['resumed_from_step']}: max abs weight difference {worst}")
    assert worst <= 1e-6, f"max abs difference {worst}"
    assert _losses(killed) == pytest.approx(_losses(straight), abs=1e-6)  # metrics were trimmed, then re-logged
    meta = json.loads((killed / "meta.json").read_text())
    assert meta["status"] == "completed" and len(meta["resumed"]) == 1


def test_two_fsdp_processes_match_one_process(cli, tiny_model, tmp_path):
    """launch.num_processes=2 runs FSDP2 over gloo through `accelerate launch`. With the same global
    batch (2 x 4 x 1 vs 1 x 4 x 2) each step sees the same samples and the same token-mean loss; only
    the order of floating-point reductions differs (gloo reduce-scatter of fp32 gradients), which moves
    losses by about 1e-7 relative. We allow 1e-5 relative: 100x that noise, far below any real bug
    (a missed gradient scale or a wrong data split changes the loss by > 1e-2)."""
    common = quick_overrides(tiny_model, "train.max_steps=6", "output.save_every_steps=3")
    one = tmp_path / "one"
    two = tmp_path / "two"
    r1 = cli("sft", *common, "train.grad_accum_steps=2", "--run-dir", str(one))
    r2 = cli("sft", *common, "train.grad_accum_steps=1", "launch.num_processes=2", "--run-dir", str(two), "--json")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    summary = json.loads(r2.stdout)
    assert summary["world_size"] == 2
    relative = max(abs(a - b) / abs(b) for a, b in zip(_losses(two), _losses(one)))
    print(f"2-process FSDP2 vs 1 process, 6 steps: max relative loss difference {relative:.2e}")
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    # the checkpoint is sharded: one DCP file per rank
    shards = sorted(p.name for p in (two / "checkpoints" / "step_000006" / "dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    a = load_file(one / "final" / "model.safetensors")
    b = load_file(two / "final" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4

    # the 2-rank DCP checkpoint of the last step, converted to HF, is the model in final/
    converted = tmp_path / "converted"
    r_conv = cli("convert-ckpt", str(two / "checkpoints" / "step_000006"), str(converted), "--json")
    assert r_conv.returncode == 0, r_conv.stderr
    assert json.loads(r_conv.stdout)["from"] == "fsdp"
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(converted)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(two / "final")(ids).logits
    assert torch.equal(got, want)

    # resume the 2-process run from its step-3 checkpoint: same end point
    import shutil

    shutil.rmtree(two / "checkpoints" / "step_000006")
    shutil.rmtree(two / "final")
    r3 = cli("sft", "--resume", "--run-dir", str(two), "--json")
    assert r3.returncode == 0, r3.stderr
    assert json.loads(r3.stdout)["resumed_from_step"] == 3
    c = load_file(two / "final" / "model.safetensors")
    assert max(float((b[k] - c[k]).abs().max()) for k in b) <= 1e-6


def test_user_error_inside_two_workers_is_one_line(cli, tiny_model, tmp_path):
    """A malformed data line found by the workers still gives exit 2 and one `error:` line: the
    launcher's own failure report (a traceback) is held back."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1", "solution": "2"}\n{"problem": \n')
    result = cli("sft", *quick_overrides(tiny_model, f"data.source={data}", "launch.num_processes=2"),
                 "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "line 2" in errors[0]


def test_two_processes_uneven_held_out_no_sync_and_a_changed_world_size(cli, tiny_model, tmp_path):
    """17 held-out rows in micro-batches of 4 on 2 processes (9 and 8 rows: the short rank runs a zero-weight
    padding copy, else FSDP hangs); gradients reduced on the last micro-batch only (train.grad_sync=last) give
    the losses and weights of reducing after every micro-batch; a checkpoint of 2 processes resumes on 1 when
    the global batch stays (2 x 4 x 2 = 1 x 4 x 4), with the held-out mean of the padded split, and is refused
    (exit 2) when it would change."""
    import shutil

    common = quick_overrides(tiny_model, "train.max_steps=6", "output.save_every_steps=3", "data.eval_rows=17",
                             "train.micro_batch_size=4", "train.grad_accum_steps=2", "launch.num_processes=2")
    last, every = tmp_path / "last", tmp_path / "every"
    r_last = cli("sft", *common, "--run-dir", str(last), "--json", timeout=300)
    assert r_last.returncode == 0, r_last.stderr[-3000:]
    r_every = cli("sft", *common, "train.grad_sync=every", "--run-dir", str(every), "--json", timeout=300)
    assert r_every.returncode == 0, r_every.stderr[-3000:]
    s_last, s_every = json.loads(r_last.stdout), json.loads(r_every.stdout)
    assert _losses(last) == pytest.approx(_losses(every), rel=1e-5)
    assert s_last["eval_loss"] == pytest.approx(s_every["eval_loss"], rel=1e-5)
    a, b = load_file(last / "final" / "model.safetensors"), load_file(every / "final" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    moved = tmp_path / "moved"
    shutil.copytree(last, moved)
    shutil.rmtree(moved / "checkpoints" / "step_000006")
    shutil.rmtree(moved / "final")
    recipe = str(moved / "recipe.yaml")
    saved_recipe = (moved / "recipe.yaml").read_text()
    refused = cli("sft", "--recipe", recipe, "launch.num_processes=1", "--resume", "--run-dir", str(moved))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and "global_batch 16 -> 8" in refused.stderr
    assert "grad_accum_steps" in refused.stderr
    assert (moved / "recipe.yaml").read_text() == saved_recipe  # a refused resume leaves the folder's recipe
    other = cli("sft", "--recipe", recipe, "train.lr=0.5", "--resume", "--run-dir", str(moved))
    assert other.returncode == 2 and "train.lr" in other.stderr  # only placement and batch split may change
    resumed = cli("sft", "--recipe", recipe, "launch.num_processes=1", "train.grad_accum_steps=4", "--resume",
                  "--run-dir", str(moved), "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_step"] == 3 and summary["world_size"] == 1
    meta = json.loads((moved / "meta.json").read_text())
    assert meta["resumed_on_other_world"] == {"from_processes": 2, "to_processes": 1, "step": 3, "examples": 79,
                                              "global_batch": 16, "total_steps": 6}
    c = load_file(moved / "final" / "model.safetensors")
    assert max(float((a[k] - c[k]).abs().max()) for k in c) < 1e-4  # (2 processes also save the tied lm_head)
    # the 1-process held-out mean over all 17 rows equals the padded 2-process one
    assert summary["eval_loss"] == pytest.approx(s_last["eval_loss"], rel=1e-4)
