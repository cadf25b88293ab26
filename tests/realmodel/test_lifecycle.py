"""The lifecycle steps on a real pretrained model, SmolLM2-135M-Instruct (dequantised from its GGUF):
its own tokenizer and ChatML template through sft's loss masks, eval on GSM8K with real responses,
and short sft, rm, grpo and mcts-sample runs from the real weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.realmodel

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO.parent / "shared" / "data" / "benchmarks"
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "train" / "gsm8k" / "train.jsonl"
IM_END = 2
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ok(result) -> dict:
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sft_masks_on_the_real_template(smollm2):
    """Only the assistant's content and its `<|im_end|>\\n` are labelled; the template's default system
    turn, the user turns and the assistant headers are not."""
    from transformers import AutoTokenizer

    from mathctl.rows import IGNORE, tokenize_conversation

    tok = AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "What is 7 * 6?"}, {"role": "assistant", "content": "7 * 6 = 42. The answer is 42."},
            {"role": "user", "content": "And 42 + 1?"}, {"role": "assistant", "content": "43"}]
    out = tokenize_conversation(chat, tok, "assistant", 4096)
    ids, labels = out["input_ids"], out["labels"]
    assert tok.decode(ids) == SYSTEM + ("<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n<|im_start|>assistant\n"
                                        "7 * 6 = 42. The answer is 42.<|im_end|>\n<|im_start|>user\nAnd 42 + 1?<|im_end|>\n"
                                        "<|im_start|>assistant\n43<|im_end|>\n")
    trained = [k for k, label in enumerate(labels) if label != IGNORE]
    assert all(labels[k] == ids[k] for k in trained)
    # two runs of consecutive trained tokens, one per assistant turn, each ending in <|im_end|> \n
    runs, start = [], trained[0]
    for a, b in zip(trained, trained[1:] + [None]):
        if b != a + 1:
            runs.append((start, a + 1))
            start = b
    assert [tok.decode(ids[s:e]) for s, e in runs] == ["7 * 6 = 42. The answer is 42.<|im_end|>\n", "43<|im_end|>\n"]
    im_ends = [k for k, t in enumerate(ids) if t == IM_END]
    assert [labels[k] == IM_END for k in im_ends] == [False, False, True, False, True]  # system, user, asst, user, asst
    completion = tokenize_conversation(chat[:2], tok, "completion", 4096)
    first = next(k for k, label in enumerate(completion["labels"]) if label != IGNORE)
    assert tok.decode(completion["input_ids"][first:]) == "<|im_start|>assistant\n7 * 6 = 42. The answer is 42.<|im_end|>\n"


def test_eval_gsm8k_extracts_answers_from_real_responses(smollm2, cli, tmp_path):
    run = tmp_path / "eval"
    summary = _ok(cli("eval", "gsm8k", "--model", str(smollm2), "--data-dir", str(BENCH), "--limit", "3",
                      "--max-new-tokens", "192", "--json", "--run-dir", str(run)))
    task = summary["tasks"]["gsm8k"]
    assert task["problems"] == 3 and summary["prompt_format"] == "chat" and task["generated_tokens"] > 0
    samples = [s for r in _lines(run / "results.jsonl") for s in r["samples"]]
    for s in samples:
        print(f"{s['finish_reason']:6} {s['num_tokens']:3} tokens, extracted {s['extracted']!r}: {s['text'][-160:]!r}")
    assert any(s["extracted"] is not None for s in samples)
    ended = [s for s in samples if s["finish_reason"] == "stop"]
    assert ended, "no response ended within 192 tokens"
    for s in samples:  # stopped at <|im_end|>: no second turn, no chat markup in the text
        assert "<|im_start|>" not in s["text"] and "<|im_end|>" not in s["text"]
    assert all(s["num_tokens"] == 192 for s in samples if s["finish_reason"] == "length")


def test_sft_on_gsm8k_lowers_the_held_out_loss(smollm2, cli, tmp_path):
    run = tmp_path / "sft"
    summary = _ok(cli("sft", "--recipe", "quickstart-sft", f"model.path={smollm2}", "model.chat_template=tokenizer",
                      f"data.source={GSM8K_TRAIN}", "data.prompt_template='{prompt}'", "data.max_rows=72",
                      "data.eval_rows=8", "train.max_steps=16", "train.micro_batch_size=4", "train.max_seq_len=384",
                      "train.lr=5e-5", "train.warmup_steps=0", "train.lr_schedule=constant", "train.eval_every_steps=16",
                      "train.eval_at_start=true", "train.log_every_steps=4", "output.save_every_steps=null",
                      "--run-dir", str(run), "--json"))
    start, end = summary["eval_loss_start"], summary["eval_loss"]
    print(f"held-out loss {start:.4f} -> {end:.4f}")
    metrics = _lines(run / "metrics.jsonl")
    assert metrics[0] == {"step": 0, "eval_loss": start} and metrics[-1]["eval_loss"] == end
    assert 0.3 < start < 3 and end < 0.9 * start  # a real model's starting value, then learning
    from transformers import AutoTokenizer

    final = AutoTokenizer.from_pretrained(run / "final")
    assert final.chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template and final.eos_token_id == IM_END


def test_rm_from_the_real_model(smollm2, cli, tmp_path):
    run = tmp_path / "rm"
    summary = _ok(cli("rm", "--recipe", "quickstart-ppm", f"model.path={smollm2}", "model.chat_template=tokenizer",
                      "data.synthetic.num_problems=40", "train.max_steps=4", "train.micro_batch_size=4",
                      "train.eval_every_steps=4", "train.lr=1e-5", "train.warmup_steps=0", "output.save_every_steps=null",
                      "--run-dir", str(run), "--json"))
    assert summary["steps"] == 4 and 0 <= summary["eval_accuracy"] <= 1
    metrics = _lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [0, 4]
    from safetensors import safe_open

    with safe_open(str(run / "final" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        head = f.get_tensor("score.weight")
    assert head.shape == (1, 576) and "model.embed_tokens.weight" in names and len(names) == 30 * 9 + 3


def test_grpo_two_steps_from_the_real_model(smollm2, cli, tmp_path):
    run = tmp_path / "grpo"
    summary = _ok(cli("grpo", "--recipe", "quickstart-grpo", f"model.path={smollm2}", "model.chat_template=tokenizer",
                      "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_completion_len=64",
                      "data.synthetic.min_ops=1", "data.synthetic.max_ops=1", "train.max_steps=2",
                      "train.micro_batch_size=4", "train.lr=1e-6", "output.save_every_steps=null",
                      "--run-dir", str(run), "--json"))
    metrics = _lines(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and summary["status"] == "completed"
    for m in metrics:
        print({k: m[k] for k in ("reward", "accuracy", "completion_len", "truncated_frac")})
        assert m["reward/correctness"] is not None and 0 <= m["reward"] <= 1
    assert min(m["truncated_frac"] for m in metrics) < 1  # some completions ended at <|im_end|>


def test_mcts_text_steps_on_two_problems(smollm2, cli, tmp_path):
    run = tmp_path / "mcts"
    _ok(cli("mcts-sample", "--recipe", "quickstart-mcts-text", f"model.path={smollm2}", "model.chat_template=tokenizer",
            "data.limit=2", "data.synthetic.num_problems=2", "search.iterations=2", "search.n_generate_sample=2",
            "search.max_depth=3", "search.max_step_tokens=32", "search.batch_problems=2",
            "--run-dir", str(run), "--json"))
    trees = _lines(run / "trees.jsonl")
    assert len(trees) == 2 and all(len(t["nodes"]) > 1 for t in trees)
    texts = [n["text"] for t in trees for n in t["nodes"][1:]]
    assert any(text.strip() for text in texts)
    assert not any("<|im_start|>" in text or "<|im_end|>" in text for text in texts)


def test_smollm2_gsm8k_pipeline_runs_every_stage(smollm2, cli, tmp_path):
    """The real quickstart, `mathctl pipeline --recipe smollm2-gsm8k`, cut to a few problems and steps: the
    model stage takes the folder, the data stages prepare the local GSM8K train copy, and every eval stage
    reports its problem count and 95% interval."""
    run = tmp_path / "pipeline"
    summary = _ok(cli("pipeline", "--recipe", "smollm2-gsm8k", f"vars.model={smollm2}", f"vars.gsm8k_train={GSM8K_TRAIN}",
                      f"vars.benchmarks={BENCH}", "vars.problems=4", "vars.sft_steps=3", "vars.grpo_steps=1",
                      "--run-dir", str(run), "--json"))
    rows = {row["folder"].rsplit("/", 1)[-1]: row for row in summary["stages"]}
    assert list(rows) == ["1-model", "2-sft-data", "3-rl-data", "4-eval-base", "5-sft", "6-eval-sft", "7-grpo",
                          "8-eval-grpo"]
    assert rows["1-model"]["outputs"]["path"] == str(smollm2)
    assert rows["2-sft-data"]["result"] == "2000 sft rows" and rows["3-rl-data"]["result"] == "7473 rl rows"
    for name in ("4-eval-base", "6-eval-sft", "8-eval-grpo"):
        assert "of 4 problems, 95% CI" in rows[name]["result"], rows[name]
    sft = _lines(run / "5-sft" / "metrics.jsonl")
    assert sft[0]["step"] == 0 and "eval_loss" in sft[0]  # the starting model's held-out loss
    assert json.loads((run / "7-grpo" / "summary.json").read_text())["steps"] == 1
