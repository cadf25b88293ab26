"""`grpo.dynamic_sampling` (DAPO): flat groups are replaced from further generation batches; the groups
trained on all have rewards that differ; a resumed run redraws exactly the prompts and completions of an
uninterrupted one; two processes keep the groups one process keeps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

P, G, ROWS, SEED, SHUFFLE = 2, 2, 24, 42, 42  # prompts a step, group size, rows, train.seed, data.shuffle_seed


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _args(model: Path, *extra: str) -> list[str]:
    """Seconds-long runs on the lively tiny model with groups of 2. Its correctness is always 0 and every
    completion runs to the 12-token limit (the overlong penalty is -0.5 for all), so a group is flat when
    both completions are longer than 30 characters (length penalty -1): measured, 4 of the first 16 groups."""
    return ["--recipe", "quickstart-grpo", f"model.path={model}", f"data.synthetic.num_problems={ROWS}",
            f"grpo.prompts_per_step={P}", f"grpo.group_size={G}", "grpo.max_completion_len=12", "train.max_steps=6",
            "train.micro_batch_size=4", "train.lr=1e-2", "output.plots=false", "output.keep_last_checkpoints=null",
            "rewards.weights={length_penalty: 1.0, correctness: 0.5}", "rewards.length_soft_chars=5",
            "rewards.length_hard_chars=30", "grpo.overlong_buffer=4", "grpo.overlong_penalty=0.5",
            "grpo.dynamic_sampling=true", "grpo.max_gen_batches=6", *extra]


class _Recorder:
    """Records every rollout generation (prompt seeds, sampling seed, completion texts and tokens) and the
    rewards of each step's trained batch (the argument of group_advantages)."""

    def __init__(self, monkeypatch):
        from mathctl.engines.hf import HFEngine
        from mathctl.grpo import train as grpo  # the training loop's module: patch the names run() calls

        self.calls: list[tuple[list[int], int, list[list[tuple[str, tuple[int, ...]]]]]] = []
        self.trained: list[list[float]] = []
        generate, advantages = HFEngine.generate, grpo.group_advantages

        def recording_generate(engine, prompts, sampling, prompt_seeds=None):
            out = generate(engine, prompts, sampling, prompt_seeds=prompt_seeds)
            self.calls.append((list(prompt_seeds), sampling.seed,
                               [[(s.text, tuple(s.token_ids)) for s in group] for group in out]))
            return out

        def recording_advantages(rewards, *args, **kwargs):
            self.trained.append(list(rewards))
            return advantages(rewards, *args, **kwargs)

        monkeypatch.setattr(HFEngine, "generate", recording_generate)
        monkeypatch.setattr(grpo, "group_advantages", recording_advantages)


def _run(*args: str) -> None:
    from mathctl.cli import main

    assert main(["grpo", *args]) == 0


def test_flat_groups_are_replaced_and_a_resume_redraws_the_same(lively_model, tmp_path, monkeypatch, capsys):
    from mathctl.grpo import PromptPlan, rewards_equal, rollout_seed

    straight = tmp_path / "straight"
    rec = _Recorder(monkeypatch)
    _run(*_args(lively_model, "output.save_every_steps=2"), "--run-dir", str(straight))
    metrics = _metrics(straight)
    assert [m["step"] for m in metrics] == list(range(1, 7))

    # the data position moves on by every prompt drawn; each batch reads on in the seeded order, sampled
    # with the seed of (train.seed, step, batch)
    plan, position, call = PromptPlan(ROWS, P, SHUFFLE), 0, 0
    for step, m in enumerate(metrics):
        assert 1 <= m["gen_batches"] <= 6
        assert m["groups_kept"] + m["groups_dropped"] + m["groups_unused"] == m["gen_batches"] * P
        for batch in range(m["gen_batches"]):
            seeds, sampling_seed, groups = rec.calls[call]
            assert seeds == plan.at(position, P) and sampling_seed == rollout_seed(SEED, step, batch)
            assert len(groups) == P and all(len(group) == G for group in groups)
            position, call = position + P, call + 1
        assert m["prompts_drawn"] == position
        assert m["zero_std_groups_frac"] == pytest.approx(m["groups_dropped"] / (m["gen_batches"] * P))
        # every trained group has rewards that differ (here enough were found in every step)
        assert m["groups_kept"] == P and m["active_frac"] == 1.0
        trained = rec.trained[step]
        assert len(trained) == P * G
        assert not any(rewards_equal(trained[i:i + G]) for i in range(0, P * G, G)), (step, trained)
        assert math.isfinite(m["loss"]) and math.isfinite(m["gen_reward"])
    assert call == len(rec.calls)
    refilled = [m["step"] for m in metrics if m["gen_batches"] > 1]
    assert any(s <= 2 for s in refilled) and any(s > 2 for s in refilled), refilled  # before and after the cut
    assert sum(m["groups_dropped"] for m in metrics) > 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["prompts_drawn"] == position
    assert summary["gen_reward_first10"] == pytest.approx(sum(m["gen_reward"] for m in metrics) / 6)
    capsys.readouterr()

    # resume from the step-2 checkpoint, whose data position is past 2 x P: the same prompts, seeds,
    # completions, metrics and weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("step_000004", "step_000006"):
        shutil.rmtree(resumed / "checkpoints" / name)
    shutil.rmtree(resumed / "final")
    state = json.loads((resumed / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["prompt_position"] == metrics[1]["prompts_drawn"] > 2 * P
    before = sum(m["gen_batches"] for m in metrics[:2])
    straight_calls = list(rec.calls)
    rec.calls.clear()
    _run("--resume", "--run-dir", str(resumed))
    assert rec.calls == straight_calls[before:]
    again = _metrics(resumed)
    assert [m["step"] for m in again] == list(range(1, 7))
    for x, y in zip(metrics, again):
        for key in ("gen_batches", "groups_kept", "groups_dropped", "groups_unused", "prompts_drawn"):
            assert y[key] == x[key], (x["step"], key)
        for key in ("reward", "gen_reward", "loss", "completion_len"):
            assert y[key] == pytest.approx(x[key], abs=1e-6), (x["step"], key)
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_pp"])
def test_other_advantages_and_too_few_groups(lively_model, tmp_path, monkeypatch, capsys, advantage):
    """With one generation batch a step at most, nothing is refilled: a step whose batch holds flat groups
    goes on with fewer groups (a warning; the flat groups, moved last, carry no loss), under rloo and
    reinforce_pp too (reinforce_pp whitens over the kept groups only)."""
    from mathctl.grpo import rewards_equal

    run = tmp_path / advantage
    rec = _Recorder(monkeypatch)
    _run(*_args(lively_model, f"grpo.advantage={advantage}", "grpo.max_gen_batches=1", "train.max_steps=4",
                "output.save_every_steps=null"), "--run-dir", str(run))
    err = capsys.readouterr().err
    metrics = _metrics(run)
    short = [m for m in metrics if m["groups_kept"] < P]
    assert short, "no step had a flat group"
    for m, trained in zip(metrics, rec.trained):
        assert m["gen_batches"] == 1 and m["groups_unused"] == 0 and m["prompts_drawn"] == m["step"] * P
        varied = [not rewards_equal(trained[i:i + G]) for i in range(0, P * G, G)]
        assert sum(varied) == m["groups_kept"] and varied == sorted(varied, reverse=True)  # flat fillers last
        assert m["active_frac"] == pytest.approx(m["groups_kept"] / P)
        assert all(math.isfinite(m[key]) for key in ("loss", "grad_norm", "reward")), m
    assert f"step {short[0]['step']}: {short[0]['groups_kept']} of {P} groups have rewards that differ" in err


@pytest.mark.slow
def test_two_processes_keep_the_groups_one_process_keeps(cli, lively_model, tmp_path):
    """2 FSDP2 processes over gloo: each generates every other prompt of a batch, the flags of all groups are
    summed over both before deciding, and the kept groups are dealt out again (a group generated on one
    process may train on the other). The hf engine seeds each completion by (seed, prompt, index), so both
    runs draw the same completions and keep the same groups; losses agree up to gloo's reduction order."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = _args(lively_model, "train.max_steps=4", "output.save_every_steps=null", "grpo.prompts_per_step=4")
    r1 = cli("grpo", *common, "--run-dir", str(one), timeout=600)
    r2 = cli("grpo", *common, "launch.num_processes=2", "--run-dir", str(two), "--json", timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads(r2.stdout)["world_size"] == 2
    a, b = _metrics(one), _metrics(two)
    assert any(m["gen_batches"] > 1 for m in a)
    for x, y in zip(a, b):
        for key in ("gen_batches", "groups_kept", "groups_dropped", "groups_unused", "prompts_drawn"):
            assert y[key] == x[key], (x["step"], key)
        for key in ("reward", "gen_reward", "completion_len", "active_frac"):
            assert y[key] == pytest.approx(x[key], abs=1e-9), (x["step"], key)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
