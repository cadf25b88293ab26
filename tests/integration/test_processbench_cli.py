"""`mathctl eval processbench --prm PATH` end to end on a tiny reward model (built, not trained: a seeded
score head on the tiny test model), with small ProcessBench-format files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_prm(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a seeded one-output score head, saved as `mathctl rm` saves a process model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("prm") / "final"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a random judge, but one whose scores differ between steps
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "mathctl_rm.json").write_text(json.dumps({"kind": "process", "prompt_template": "{prompt}"}))
    return out


def _solution(k: int, label: int, steps: int = 3) -> dict:
    a, b = k % 7 + 1, k % 5 + 2
    lines = [f"Ava has {a} apples and gets {b} more.", f"So she has {a} + {b} = {a + b} apples.",
             f"The answer is \\boxed{{{a + b}}}."][:steps]
    if label >= 0:
        lines[label] = lines[label].replace(str(a + b), str(a + b + 1))
    return {"id": f"t-{k}", "generator": "hand", "problem": f"Ava has {a} apples and gets {b} more. How many?",
            "steps": lines, "final_answer_correct": label == -1, "label": label}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    folder = tmp_path / "data" / "processbench"
    folder.mkdir(parents=True)
    for name in ("gsm8k", "math"):
        rows = [_solution(k, [-1, 1, 2, -1, 1][k % 5]) for k in range(10)]
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return folder.parent


def test_processbench_end_to_end_and_resume(cli, tiny_prm, data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["eval", "processbench", "--prm", str(tiny_prm), "--data-dir", str(data_dir), "--run-dir", str(run),
            "eval.processbench.splits=[gsm8k,math]", "eval.processbench.calibration_fraction=0.25", "--json"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["benchmark"] == "processbench" and summary["threshold_source"] == "calibrated"
    assert summary["prm_kind"] == "process" and summary["calibration"]["solutions"] == 2 * 3  # 1 of 4 correct, 2 of 6 erroneous
    for name in ("gsm8k", "math"):
        entry = summary["splits"][name]
        assert entry["solutions"] == 7 and entry["erroneous"] == 4 and entry["correct"] == 3
        assert 0.0 <= entry["f1"] <= 1.0
    assert "ProcessBench" in result.stderr and "F1 %" in result.stderr  # the table
    assert (run / "recipe.yaml").is_file() and json.loads((run / "meta.json").read_text())["status"] == "completed"

    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    threshold = summary["threshold"]
    for row in rows:  # the prediction is the first step scored below the threshold
        assert len(row["step_scores"]) == row["num_steps"] == 3
        below = [k for k, s in enumerate(row["step_scores"]) if s < threshold]
        assert row["prediction"] == (below[0] if below else -1)
    assert len({tuple(r["step_scores"]) for r in rows}) > 1  # the scores differ from solution to solution

    # a kill in the middle: the resumed run scores the rest and reaches the same result
    lines = (run / "results.jsonl").read_text().splitlines()
    (run / "results.jsonl").write_text("".join(line + "\n" for line in lines[:9]) + lines[9][:20])
    (run / "summary.json").unlink()
    again = cli("eval", "--resume", "--run-dir", str(run), "--json")
    assert again.returncode == 0, again.stderr
    resumed = json.loads(again.stdout)
    assert resumed["splits"] == summary["splits"] and resumed["threshold"] == pytest.approx(threshold)
    assert len((run / "results.jsonl").read_text().splitlines()) == 20


def test_given_threshold_reports_every_solution(cli, tiny_prm, data_dir, tmp_path):
    result = cli("eval", "processbench", "--prm", str(tiny_prm), "--data-dir", str(data_dir), "--threshold", "0",
                 "--limit", "5", "eval.processbench.splits=[math]", "--run-dir", str(tmp_path / "r"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["threshold"] == 0.0 and summary["threshold_source"] == "given" and summary["calibration"] is None
    assert summary["splits"]["math"]["solutions"] == 5 and summary["average_f1"] == summary["splits"]["math"]["f1"]


@pytest.mark.parametrize("case, message", [
    ("missing", "processbench/gsm8k.json does not exist"),
    ("malformed", "math.json record 4 (id t-3): no field 'label'"),
    ("model", "uses no --model"),
    ("no-prm", "needs the process reward model"),
])
def test_bad_input_exits_2_with_one_error_line(cli, tiny_prm, data_dir, tmp_path, case, message):
    args = ["eval", "processbench", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "r"),
            "eval.processbench.splits=[math]"]
    if case == "missing":
        args[-1] = "eval.processbench.splits=[gsm8k,math]"
        (data_dir / "processbench" / "gsm8k.json").unlink()
    if case == "malformed":
        path = data_dir / "processbench" / "math.json"
        rows = json.loads(path.read_text())
        del rows[3]["label"]
        path.write_text(json.dumps(rows))
    if case == "model":
        args += ["--model", str(tiny_prm)]
    if case != "no-prm":
        args += ["--prm", str(tiny_prm)]
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "hint:" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1
    assert not (tmp_path / "r").exists()  # refused before a run folder is made
