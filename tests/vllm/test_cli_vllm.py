"""The commands on real vLLM: eval gives the hf engine's greedy answers; GRPO on colocated vLLM engines
(one per process, and one tensor-parallel engine over two processes) runs, resumes after a SIGKILL to
the same run, and stops when the engine is sampling from the wrong weights."""

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

pytestmark = pytest.mark.vllm  # run in .venv-vllm by tests/vllm/run; not in the default run

BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_eval_on_vllm_gives_the_hf_engines_greedy_answers(cli, vllm_model, tmp_path, monkeypatch):
    """`mathctl eval math500 --model M engine.backend=vllm`, in vLLM's default multiprocess mode."""
    args = ["eval", "math500", "--model", str(vllm_model), "--data-dir", str(BENCH), "--limit", "12",
            "--max-new-tokens", "40", "--json"]
    hf = cli(*args, "engine.backend=hf", "--run-dir", str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr[-3000:]
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    vllm = cli(*args, "engine.backend=vllm", "--run-dir", str(tmp_path / "vllm"))
    assert vllm.returncode == 0, vllm.stderr[-3000:]
    summary = json.loads(vllm.stdout.strip().splitlines()[-1])
    assert summary["backend"] == "vllm"
    a, b = _rows(tmp_path / "hf"), _rows(tmp_path / "vllm")
    assert len(a) == len(b) == 12
    for x, y in zip(sorted(a, key=lambda r: r["index"]), sorted(b, key=lambda r: r["index"])):
        for field in ("text", "num_tokens", "finish_reason", "extracted", "correct"):
            assert [s[field] for s in x["samples"]] == [s[field] for s in y["samples"]], field


def _grpo(model: Path, *extra: str) -> list[str]:
    """A seconds-long GRPO run (the default suite's `_quick`) on the vLLM-shaped tiny model."""
    return ["grpo", "--recipe", "quickstart-grpo", f"model.path={model}", "data.synthetic.num_problems=24",
            "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.max_completion_len=12", "train.micro_batch_size=4",
            "train.lr=1e-2", "rewards.weights={length_penalty: 1.0, correctness: 0.5}", "rewards.length_soft_chars=5",
            "rewards.length_hard_chars=60", "engine.backend=vllm", "engine.max_model_len=256", "output.plots=false",
            *extra]


KEYS = ("reward", "loss", "completion_len", "clip_frac", "entropy")


def test_two_process_grpo_on_colocated_vllm_resumes_after_sigkill(cli, vllm_model, tmp_path):
    """Two processes (FSDP2 over gloo), one vLLM engine each (external launcher), weights streamed from
    the shards after every step: the engine's log-probs stay at the trainer's (the push is right), a
    SIGKILL after the step-2 checkpoint and `--resume` give the uninterrupted run's metrics and
    weights, and a tensor-parallel engine over both processes draws the same samples."""
    args = _grpo(vllm_model, "launch.num_processes=2", "train.max_steps=6", "output.save_every_steps=2")
    straight = tmp_path / "straight"
    done = cli(*args, "--run-dir", str(straight), "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["backend"] == "vllm" and summary["is_correction"] == "tis"
    for record in _metrics(straight):
        assert record["logprob_diff"] < 1e-4, record  # every push reached the engine
        assert record["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "mathctl", *args, "--run-dir", str(killed)], stdout=log,
                               stderr=log, env=dict(os.environ), start_new_session=True)
    marker = killed / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 400
    while not marker.exists():
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.time() < deadline, "no checkpoint within 400 s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
    process.wait()
    assert not (killed / "final").exists(), "the kill came too late to be mid-run"

    resumed = cli("grpo", "--resume", "--run-dir", str(killed), "--json")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] >= 2
    a, b = _metrics(straight), _metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for k in KEYS:
            assert y[k] == pytest.approx(x[k], abs=1e-6), (x["step"], k)
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6

    tp = tmp_path / "tp2"
    result = cli(*_grpo(vllm_model, "launch.num_processes=2", "train.max_steps=3", "output.save_every_steps=null",
                        "engine.tensor_parallel_size=2"), "--run-dir", str(tp), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    for x, y in zip(a, _metrics(tp)):
        assert y["reward"] == pytest.approx(x["reward"], abs=1e-6) and y["logprob_diff"] < 1e-4


def test_wrong_weights_in_the_vllm_engine_stop_the_run(vllm_model, tmp_path, monkeypatch, capsys):
    """One process, the engine colocated in it: the push after step 1 carries noise, so step 2's
    samples come from another model, the gap jumps far over grpo.max_logprob_diff and the run stops
    with exit 2 and one `error:` line; the engine is shut down on the way out (no process group left)."""
    import torch.distributed as dist
    from conftest import noisy_weights

    from mathctl.cli import main
    from mathctl.grpo import train as grpo  # the training loop's module: patch the names run() calls

    monkeypatch.setattr(grpo, "engine_weights", noisy_weights(grpo.engine_weights))
    run = tmp_path / "wrong"
    code = main([*_grpo(vllm_model, "train.max_steps=3", "output.save_every_steps=null"), "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 2:" in errors[0] and "grpo.max_logprob_diff" in errors[0], err[-3000:]
    [first] = _metrics(run)
    assert first["logprob_diff"] < 1e-4
    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ
