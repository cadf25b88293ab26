"""The quickstart lifecycle: a tiny model learns synthetic arithmetic (sft), then `mathctl eval`
scores it on held-out problems of another seed, as the README's quickstart command does."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_sft_then_eval_measures_what_was_learned(tmp_path, cli, sft_policy):
    heldout = tmp_path / "heldout.jsonl"
    proc = cli("data", "synthetic", str(heldout), "-n", "60", "--seed", "1", "--max-digits", "1")
    assert proc.returncode == 0, proc.stderr
    common = ["eval", "--recipe", "quickstart-eval", str(heldout), "--json"]
    trained = cli(*common, "--model", str(sft_policy), "--run-dir", str(tmp_path / "e1"))
    assert trained.returncode == 0, trained.stderr
    untrained = cli(*common, "--model", "tiny:qwen2-small", "--run-dir", str(tmp_path / "e0"))
    assert untrained.returncode == 0, untrained.stderr
    after = json.loads(trained.stdout)["score"][str(heldout)]
    before = json.loads(untrained.stdout)["score"][str(heldout)]
    assert before == 0.0
    assert after >= 0.5  # 0.855 on 200 problems (the README quickstart)
    records = [json.loads(line) for line in (tmp_path / "e1" / "results.jsonl").read_text().splitlines()]
    right = [r for r in records if r["num_correct"]]
    assert right and all(s["extracted"] is not None for r in right for s in r["samples"])
