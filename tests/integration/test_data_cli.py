"""`mathctl data prepare` from the command line, and `mathctl sft` training on what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "train"


def test_prepare_then_sft_reads_flat_and_packed_folders(tmp_path, cli, tiny_model):
    for name, extra in (("flat", []), ("packed", ["pack=true", "seq_len=512"])):
        proc = cli("data", "prepare", "synthetic", "--out", str(tmp_path / name), "--tokenizer", str(tiny_model),
                   "synthetic_rows=64", "chat_template=chatml", "max_seq_len=256", *extra, "--json")
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)
        assert stats["rows_out"] == 64 and stats["tokens"] > 0
        run = tmp_path / f"sft-{name}"
        proc = cli("sft", "--recipe", "quickstart-sft", f"model.path={tiny_model}", f"data.source={tmp_path / name}",
                   "data.eval_rows=0", "train.max_steps=2", "train.micro_batch_size=4", "train.max_seq_len=256",
                   "output.plots=false", "--run-dir", str(run), "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["status"] == "completed"
        assert summary["data"]["train_rows"] == 64  # the packed rows were split back into the 64 samples


def test_prepare_errors_exit_2(tmp_path, cli):
    proc = cli("data", "prepare", "openmath3", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "known: openmath2" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "generated_solution": "s"}\n')
    proc = cli("data", "prepare", "openmath2", "--input", str(bad), "--out", str(tmp_path / "o"), "--kind", "rl")
    assert proc.returncode == 2
    assert "field expected_answer missing in the first row" in proc.stderr and "openmath2" in proc.stderr
    proc = cli("data", "prepare", "gsm8k", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"), "--kind", "rl")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = cli("data", "prepare", "gsm8k", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "needs a tokenizer" in proc.stderr
