"""`mathctl grpo` end to end: learning on the quickstart policy, resume after a real kill, two FSDP
processes with LoRA and a KL term, bad input."""

from __future__ import annotations

import json
import math
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
                "generation_s", "reward_s", "train_s", "logprob_diff", "no_answer_frac"):
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


@pytest.mark.slow
def test_two_fsdp_processes_with_a_sharded_reference_model(cli, lively_model, tmp_path):
    """beta > 0 without LoRA on 2 FSDP2 processes: the reference model is loaded shard by shard and sharded like
    the policy (its forwards are collective, one per micro-batch of each rank's equal share). KL 0 at the first
    step (policy == reference), positive after an update."""
    run = tmp_path / "ref"
    result = cli("grpo", *_quick(lively_model, "launch.num_processes=2", "grpo.beta=0.1", "train.max_steps=2",
                                 "output.save_every_steps=null", "output.plots=false"),
                 "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    assert "reference model: copy (sharded)" in result.stderr
    metrics = _metrics(run)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[-1]["kl"] > 0


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


@pytest.mark.parametrize("options", [
    ["grpo.loss_type=gspo", "grpo.mini_batches=2", "grpo.epsilon_low=3e-4", "grpo.epsilon_high=4e-4"],
    ["grpo.loss_type=cispo", "grpo.mini_batches=2", "grpo.epsilon_low=10", "grpo.epsilon_high=0.2"],
    ["grpo.advantage=rloo", "grpo.filter_groups=true"],
    ["grpo.advantage=reinforce_pp", "grpo.overlong_buffer=6", "grpo.overlong_penalty=0.5"],
], ids=["gspo", "cispo", "rloo", "reinforce_pp-overlong"])
def test_other_objectives_run(cli, lively_model, tmp_path, options):
    """GSPO and CISPO with two optimiser steps per rollout (so logp_old differs from logp), RLOO with group
    filtering, REINFORCE++ with the overlong penalty: two steps each, finite losses. The logged reward is
    the reward functions' weighted sum plus the overlong penalty, and a truncated completion (length
    max_completion_len) carries the whole penalty."""
    run = tmp_path / "run"
    result = cli("grpo", *_quick(lively_model, *options, "train.max_steps=2", "output.save_every_steps=null",
                                 "output.plots=false"), "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    for record in _metrics(run):
        assert all(math.isfinite(record[key]) for key in ("loss", "grad_norm", "clip_frac", "reward")), record
        penalty = record.get("overlong_penalty", 0.0)
        assert record["reward"] == pytest.approx(record["reward/length_penalty"] + 0.5 * record["reward/correctness"]
                                                 + penalty, abs=1e-9)
        if "grpo.overlong_buffer=6" in options:
            assert -0.5 <= penalty <= -0.5 * record["truncated_frac"] + 1e-9, record
        else:
            assert "overlong_penalty" not in record


@pytest.mark.parametrize(("correction", "level", "mini_batches"), [("tis", "token", 1), ("mis", "sequence", 2)])
def test_mismatch_is_measured_before_the_updates(cli, lively_model, tmp_path, correction, level, mini_batches):
    """Correction forced on for the hf engine (auto turns it off), with one optimiser step per rollout
    (logp_old from the training forward) and with two at a large learning rate (logp_old from an extra
    pass): either way the gap and the weights come from the policy before the step's first update, so
    they stay at the hf engine's ~1e-6 and 1. (Measured on the live policy, as before, the second
    mini-batch's gap was the first update's size: 0.43 and 0.28 nats on this run.)"""
    run = tmp_path / correction
    result = cli("grpo", *_quick(lively_model, f"grpo.mini_batches={mini_batches}", "train.micro_batch_size=2",
                                 "train.max_steps=2", f"grpo.is_correction={correction}", f"grpo.is_level={level}",
                                 "output.save_every_steps=null", "output.plots=false"),
                 "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["is_correction"] == correction
    for record in _metrics(run):
        assert record["logprob_diff"] < 1e-4 and record["logprob_diff_max"] < 1e-3, record
        for key in ("is_weight_mean", "is_weight_min", "is_weight_max"):
            assert record[key] == pytest.approx(1.0, abs=1e-3), key
        assert record[f"is_{'clipped' if correction == 'tis' else 'masked'}_frac"] == 0.0


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



def test_wrong_weights_in_the_engine_stop_the_run(lively_model, tmp_path, monkeypatch, capsys):
    """The engine gets wrong weights after step 1 (every matrix pushed with noise, as a broken weight
    sync would do): step 2's samples come from another model, the engine/trainer log-prob gap jumps from
    ~1e-6 to about 2 nats (measured; noise of std 0.02 already gives 0.5), and the run stops with exit 2
    and one `error:` line before the optimiser updates on them."""

    from conftest import noisy_weights

    from mathctl.cli import main
    from mathctl.grpo import train as grpo  # the training loop's module: patch the names run() calls

    monkeypatch.setattr(grpo, "engine_weights", noisy_weights(grpo.engine_weights))
    run = tmp_path / "wrong"
    code = main(["grpo", *_quick(lively_model, "train.max_steps=3", "output.save_every_steps=null", "output.plots=false"),
                 "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 2:" in errors[0] and "grpo.max_logprob_diff=0.5" in errors[0], err
    assert "hint:" in err and "weight" in err and "Traceback" not in err
    [first] = _metrics(run)  # step 1 ran with the right weights; step 2 stopped before its update
    assert first["logprob_diff"] < 1e-4
    assert json.loads((run / "meta.json").read_text())["status"] == "failed"
    assert not (run / "final").exists()
