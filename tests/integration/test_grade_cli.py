"""`mathctl grade FILE.jsonl` through the real CLI."""

from __future__ import annotations

import json

from mathctl.cli import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_grade_file_json_summary_and_out(tmp_path, capsys):
    rows = [
        {"id": 1, "response": "3 + 4 = 7, so the answer is \\boxed{7}.", "answer": "7"},
        {"id": 2, "response": "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "answer": 0.5},
        {"id": 3, "response": "#### 1,234", "answer": "1234"},
        {"id": 4, "response": "so \\boxed{8}", "answer": "7"},
        {"id": 5, "response": "I am not sure how to solve this problem at all.", "answer": ["3", "three"]},
    ]
    data, out = tmp_path / "responses.jsonl", tmp_path / "graded.jsonl"
    _write(data, rows)
    assert main(["grade", str(data), "--out", str(out), "--json", "--run-dir", str(tmp_path / "run")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"total": 5, "correct": 3, "accuracy": 0.6}
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, True, True, False, False]
    assert graded[0]["extracted"] == "7" and graded[4]["extracted"] is None
    assert graded[0]["id"] == 1  # the row is kept
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["correct"] == 3


def test_grade_custom_fields(tmp_path, capsys):
    data = tmp_path / "r.jsonl"
    _write(data, [{"completion": "\\boxed{(1, 2)}", "gold": "(1,2)"}])
    assert main(["grade", str(data), "--response-field", "completion", "--answer-field", "gold", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 1


def test_grade_bad_input_exits_2_naming_the_line(cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"response": "\\\\boxed{1}", "answer": "1"}\n{"response": oops}\n')
    result = cli("grade", str(data))
    assert result.returncode == 2 and "line 2" in result.stderr and "Traceback" not in result.stderr
    data.write_text('{"response": "\\\\boxed{1}", "answer": "1"}\n{"response": "\\\\boxed{2}"}\n')
    result = cli("grade", str(data))
    assert result.returncode == 2 and "line 2" in result.stderr and "'answer'" in result.stderr
    result = cli("grade", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr
