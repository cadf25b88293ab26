"""`mathctl grpo` end to end: learning on the quickstart policy, resume after a real kill, two FSDP
processes with LoRA and a KL term, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _quick(model: Path, *extra: str) -> list[str]:
    """A seconds-long GRPO run on the tiny random model. Correctness is always 0 for it, so the reward
    is a length penalty (it varies within groups, so advantages and updates are real)."""
    return ["--recipe", "quickstart-grpo", f"model.path={model}", "data.synthetic.num_problems=24",
            "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.max_completion_len=12", "train.max_steps=4",
            "train.micro_batch_size=4", "train.lr=1e-2", "output.save_every_steps=2",
            "rewards.weights={length_penalty: 1.0, correctness: 0.5}", "rewards.length_soft_chars=5",
            "rewards.length_hard_chars=60", *extra]


@pytest.mark.slow
def test_quickstart_grpo_raises_the_reward(quickstart_pipeline):
    """The issue's bar, on the shipped recipe from the quickstart SFT policy (the quickstart pipeline's
    grpo stage: `mathctl grpo --recipe quickstart-grpo --model SFT`): the mean reward of the last 10
    steps beats the first 10 by >= 0.10. Why that margin: the recipe's 80 prompts are revisited every 10
    steps, so both windows are the same 80 problems sampled 8 times (640 completions) and the
    difference carries no problem-difficulty noise, only sampling noise: about sqrt(2 * 0.2 / 640) =
    0.025 for independent samples, so 0.10 is 4 standard errors. The run is seeded (same samples every
    time on a given torch build); it measured 0.652 -> 0.809 (+0.157) with the pass means rising nearly
    monotonically; a run that does not learn has an expected difference of 0."""
    run = quickstart_pipeline[0] / "7-grpo"
    summary = json.loads((run / "summary.json").read_text())
    rewards = [m["reward"] for m in _metrics(run)]
    print("mean reward per 10-step pass:", [round(sum(rewards[i:i + 10]) / 10, 3) for i in range(0, len(rewards), 10)])
    assert len(rewards) == 100
    assert summary["reward_last10"] - summary["reward_first10"] >= 0.10
    record = _metrics(run)[-1]
    for key in ("reward", "reward_std", "reward/correctness", "accuracy", "completion_len", "clip_frac", "entropy",
                "generation_s", "reward_s", "train_s", "logprob_diff"):
        assert key in record, key
    assert record["logprob_diff"] < 1e-3  # the engine got every update: its log-probs are the trainer's
    assert (run / "plots" / "reward.png").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_run(cli, lively_model, tmp_path):
    """kill -9 after the step-2 checkpoint of 30, resume: the same samples are drawn (seeded per step
    and prompt), so rewards, losses and final weights equal an uninterrupted run's."""
    args = _quick(lively_model, "train.max_steps=30", "grpo.mini_batches=2", "grpo.epochs=2", "output.plots=false")
    straight = tmp_path / "straight"
    assert cli("grpo", *args, "--run-dir", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "mathctl", "grpo", *args, "--run-dir", str(killed)],
                               stdout=log, stderr=log, env=dict(os.environ))
    marker = killed / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the kill came too late to be mid-run"

    resumed = cli("grpo", "--resume", "--run-dir", str(killed), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] >= 2
    keys = ("reward", "loss", "completion_len", "clip_frac", "entropy")
    a, b = _metrics(straight), _metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 31))
    for x, y in zip(a, b):
        for k in keys:
            assert y[k] == pytest.approx(x[k], abs=1e-6), (x["step"], k)
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.slow
def test_two_fsdp_processes_with_lora_and_kl(cli, lively_model, tmp_path):
    """FSDP2 over gloo, 2 processes, LoRA adapters, beta > 0 (the reference is the base with the
    adapters off). The KL is 0 at the first step (policy == reference) and positive after updates."""
    run = tmp_path / "fsdp"
    result = cli("grpo", *_quick(lively_model, "launch.num_processes=2", "lora.enabled=true", "lora.r=4",
                                 "grpo.beta=0.1", "train.max_steps=3", "output.save_every_steps=null"),
                 "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["world_size"] == 2
    metrics = _metrics(run)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[-1]["kl"] > 0
    assert (run / "final" / "adapter").is_dir()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")


def test_options_that_change_the_objective_run(cli, lively_model, tmp_path):
    """dr_grpo, group filtering and truncation masking on one process; a truncated completion with
    mask_truncated is not trained on (active_frac < 1)."""
    run = tmp_path / "opts"
    result = cli("grpo", *_quick(lively_model, "grpo.loss_type=dr_grpo", "grpo.filter_groups=true",
                                 "grpo.mask_truncated=true", "grpo.max_completion_len=4", "train.max_steps=2",
                                 "output.save_every_steps=null", "output.plots=false"),
                 "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    record = _metrics(run)[0]
    assert record["truncated_frac"] > 0 and record["active_frac"] <= 1 - record["truncated_frac"] + 1e-9


def test_bad_input_exits_2_without_traceback(cli, tiny_model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n")
    result = cli("grpo", *_quick(tiny_model, f"data.source={rows}"), "--run-dir", str(tmp_path / "r1"))
    assert result.returncode == 2
    assert "row 2" in result.stderr and "gold answer" in result.stderr and "Traceback" not in result.stderr

    result = cli("grpo", *_quick(tiny_model, "grpo.group_sise=4"), "--run-dir", str(tmp_path / "r2"))
    assert result.returncode == 2 and "group_size" in result.stderr and "Traceback" not in result.stderr

    result = cli("grpo", *_quick(tiny_model, "data.source=/nonexistent/rl"), "--run-dir", str(tmp_path / "r3"))
    assert result.returncode == 2 and "/nonexistent/rl" in result.stderr and "Traceback" not in result.stderr
