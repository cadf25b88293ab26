"""The quickstart lifecycle: a tiny model learns synthetic arithmetic (sft), then `mathctl eval`
scores it on held-out problems of another seed, as the README's quickstart command does."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_sft_then_eval_measures_what_was_learned(tmp_path, cli):
    run = tmp_path / "sft"
    proc = cli("sft", "--recipe", "quickstart-sft", "--run-dir", str(run), "train.max_steps=200", "data.eval_rows=16",
               "train.eval_every_steps=null", "output.save_every_steps=null", "output.plots=false")
    assert proc.returncode == 0, proc.stderr
    heldout = tmp_path / "heldout.jsonl"
    proc = cli("data", "synthetic", str(heldout), "-n", "60", "--seed", "1", "--max-digits", "1")
    assert proc.returncode == 0, proc.stderr
    common = ["eval", "--recipe", "quickstart-eval", str(heldout), "--json"]
    trained = cli(*common, "--model", str(run / "final"), "--run-dir", str(tmp_path / "e1"))
    assert trained.returncode == 0, trained.stderr
    untrained = cli(*common, "--model", "tiny:qwen2-small", "--run-dir", str(tmp_path / "e0"))
    assert untrained.returncode == 0, untrained.stderr
    after = json.loads(trained.stdout)["score"][str(heldout)]
    before = json.loads(untrained.stdout)["score"][str(heldout)]
    assert before == 0.0
    assert after >= 0.1  # 0.22 on 100 problems after these 200 steps; 0.69 after the full 500
    records = [json.loads(line) for line in (tmp_path / "e1" / "results.jsonl").read_text().splitlines()]
    right = [r for r in records if r["num_correct"]]
    assert right and all(s["extracted"] is not None for r in right for s in r["samples"])
