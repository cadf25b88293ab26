"""`mathctl rm` end to end: train, resume to the same weights, bad pair files, eval --prm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file


def _quick(model: Path, *extra: str) -> list[str]:
    return ["--recipe", "quickstart-ppm", f"model.path={model}", "data.synthetic.num_problems=120",
            "train.max_steps=6", "train.micro_batch_size=8", "train.eval_every_steps=3", "output.save_every_steps=3",
            "train.warmup_steps=0", *extra]


@pytest.fixture(scope="module")
def ppm_run(tiny_model, tmp_path_factory):
    from conftest import run_cli

    run = tmp_path_factory.mktemp("ppm") / "a"
    result = run_cli("rm", *_quick(tiny_model), "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    return run, json.loads(result.stdout)


def test_process_rm_trains_saves_and_resumes(cli, tiny_model, tmp_path, ppm_run):
    (straight, summary), resumed = ppm_run, tmp_path / "b"
    assert summary["kind"] == "process" and summary["steps"] == 6 and 0 <= summary["eval_accuracy"] <= 1
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [0, 3, 6]  # the curve starts untrained
    final = straight / "final"
    assert json.loads((final / "mathctl_rm.json").read_text())["kind"] == "process"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1

    # the same run on 2 FSDP processes (half the micro-batch each), killed after step 3 and resumed: the same
    # weights (rm's loss starts from the score head's output through a hook, not from the model's output)
    r2 = cli("rm", *_quick(tiny_model, "launch.num_processes=2", "train.micro_batch_size=4"), "--run-dir", str(resumed))
    assert r2.returncode == 0, r2.stderr
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    shutil.rmtree(resumed / "final")
    r3 = cli("rm", "--resume", "--run-dir", str(resumed), "--json")
    assert r3.returncode == 0, r3.stderr
    assert json.loads(r3.stdout)["resumed_from_step"] == 3
    a, b = load_file(final / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5

    # the run's checkpoint converts to the same HF reward model
    conv = cli("convert-ckpt", str(straight), str(tmp_path / "conv"), "--json")
    assert conv.returncode == 0, conv.stderr
    c = load_file(tmp_path / "conv" / "model.safetensors")
    assert sorted(c) == sorted(a) and all(float((a[k] - c[k]).abs().max()) == 0 for k in a)


def test_outcome_rm_and_lora(cli, tiny_model, tmp_path):
    result = cli("rm", *_quick(tiny_model, "rm.kind=outcome", "lora.enabled=true", "lora.r=4"),
                 "--run-dir", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kind"] == "outcome" and summary["data"]["pairs"] == 120
    from mathctl.rm import RewardScorer

    scorer = RewardScorer.from_pretrained(str(tmp_path / "o" / "final"), device="cpu")
    values = scorer.score_outcomes([("What is 2+3?", "2 + 3 = 5.\n"), ("What is 2+3?", "2 + 3 = 6.\n")])
    assert len(values) == 2 and all(isinstance(v, float) for v in values)


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "prefix": [], "pos": "a"}\n', "line 1: no field 'neg'"),
    ('{"question": "q", "prefix": [], "pos": "a", "neg": "b"}\nnot json\n', "line 2"),
])
def test_bad_pair_file_exits_2_naming_the_line(cli, tiny_model, tmp_path, content, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(content)
    result = cli("rm", *_quick(tiny_model, f"data.source={pairs}"), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_eval_best_of_n_with_a_prm(cli, lively_model, tmp_path, ppm_run):
    rm = ppm_run[0]
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    result = cli("eval", str(problems), "--model", str(lively_model), "--n", "4", "--temperature", "1.0",
                 "--max-new-tokens", "16", "--prm", str(rm / "final"), "--run-dir", str(tmp_path / "e"), "--json",
                 "model.chat_template=chatml")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    task = next(iter(summary["tasks"].values()))
    assert set(task["bon@k"]) == {"1", "2", "4"}
    rows = [json.loads(line) for line in (tmp_path / "e" / "results.jsonl").read_text().splitlines()]
    assert all(isinstance(s["score"], float) for r in rows for s in r["samples"])


@pytest.mark.slow
def test_tiny_ppm_learns_to_judge_arithmetic_steps(quickstart_pipeline):
    """On synthetic step pairs (the chosen step computes right, the rejected one is off by 1-3), a tiny
    PPM initialised from the quickstart SFT policy (as rStar initialises its PPM from the policy) learns
    to judge held-out steps of unseen problems. This is the quickstart pipeline's ppm stage (`mathctl
    rm --recipe quickstart-ppm --model SFT`). Measured: 0.51 (untrained) -> 0.926 when the recipe was
    tuned; 0.556 -> 0.861 in the 2026-12-06 environment with the same code and seeds (the SFT policy it
    starts from changed with the installed packages; 1500 steps reached 0.889). The bar, 0.8, leaves
    about 6 standard errors (~1200 held-out pairs) under the 0.861 and is far above the untrained
    head; the step-0 value guards against a test that cannot fail (an untrained head is near chance)."""
    run = quickstart_pipeline[0] / "9-ppm"
    curve = {m["step"]: m["eval_accuracy"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval_accuracy" in m}
    print("held-out pairwise accuracy by step:", {k: round(v, 3) for k, v in curve.items()})
    assert curve[0] < 0.7
    assert json.loads((run / "summary.json").read_text())["eval_accuracy"] > 0.8
    assert (run / "final" / "mathctl_rm.json").is_file()
