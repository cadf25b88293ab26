"""Real vLLM on a real pretrained model, SmolLM2-135M-Instruct (the realmodel fixture's folder, dequantised
from its GGUF to fp32): eval on GSM8K gives the hf engine's greedy answers from the model's own ChatML
template, stopping at <|im_end|>; and GRPO with the engine colocated pushes the trained weights into it
(SmolLM2 ties its input and output embeddings), so the engine's log-probs stay at the trainer's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm  # run in .venv-vllm by tests/vllm/run; not in the default run

BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_gsm8k_on_vllm_matches_the_hf_engine(cli, smollm2, tmp_path):
    args = ["eval", "gsm8k", "--model", str(smollm2), "--data-dir", str(BENCH), "--limit", "6",
            "--max-new-tokens", "160", "model.chat_template=tokenizer", "--json"]
    runs = {}
    for backend in ("hf", "vllm"):
        result = cli(*args, f"engine.backend={backend}", "engine.max_model_len=1024", "--run-dir", str(tmp_path / backend))
        assert result.returncode == 0, result.stderr[-4000:]
        assert json.loads(result.stdout.strip().splitlines()[-1])["backend"] == backend
        runs[backend] = {r["index"]: r["samples"][0] for r in _lines(tmp_path / backend / "results.jsonl")}
    assert sorted(runs["hf"]) == sorted(runs["vllm"]) and len(runs["hf"]) == 6
    same = 0
    for index, a in runs["hf"].items():
        b = runs["vllm"][index]
        print(f"{index}: hf {a['finish_reason']} {a['num_tokens']} {a['extracted']!r} | vllm {b['finish_reason']} "
              f"{b['num_tokens']} {b['extracted']!r}")
        assert "<|im_end|>" not in b["text"] and "<|im_start|>" not in b["text"]
        assert b["finish_reason"] in ("stop", "length")
        assert b["num_tokens"] < 160 or b["finish_reason"] == "length"
        # fp32 on both sides; a real model has near-ties, so a long greedy answer may part late
        assert b["text"][:80] == a["text"][:80], index
        same += a["text"] == b["text"] and a["extracted"] == b["extracted"]
    assert same >= 5, f"only {same} of 6 greedy answers are the same on both engines"
    assert any(s["finish_reason"] == "stop" for s in runs["vllm"].values())


def test_grpo_on_colocated_vllm_keeps_the_engine_at_the_trainers_weights(cli, smollm2, tmp_path):
    run = tmp_path / "grpo"
    result = cli("grpo", "--recipe", "quickstart-grpo", f"model.path={smollm2}", "model.chat_template=tokenizer",
                 "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_completion_len=48",
                 "data.synthetic.min_ops=1", "data.synthetic.max_ops=1", "train.max_steps=3", "train.micro_batch_size=4",
                 "train.lr=1e-5", "engine.backend=vllm", "engine.max_model_len=512", "output.save_every_steps=null",
                 "output.plots=false", "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["backend"] == "vllm"
    metrics = _lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # steps 2 and 3 sample from pushed weights: a wrong or partial push shows here
        print({k: m[k] for k in ("reward", "logprob_diff", "completion_len", "truncated_frac")})
        assert m["logprob_diff"] < 1e-3, m
