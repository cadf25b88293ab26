"""`mathctl dpo` and `mathctl data pairs` end to end on the tiny model: train and reload, SIGKILL and resume to the
same weights, the LoRA reference cached or with the adapters off, bad pair files, pairs from graded samples."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file


def _write_pairs(path: Path, n: int = 48) -> Path:
    """Synthetic pairs, the chosen solution right, the rejected one's boxed answer off by one, in the three shapes
    the loader accepts (text; a messages prompt with text responses; full conversations, UltraFeedback style)."""
    from mathctl.synthetic import SyntheticSpec, generate

    lines = []
    for i, r in enumerate(generate(SyntheticSpec(num_problems=n, seed=2, max_digits=1, min_ops=1, max_ops=2))):
        wrong = r["solution"].replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{int(r['answer']) + 1}}}")
        user = {"role": "user", "content": r["problem"]}
        if i % 3 == 0:
            row = {"prompt": r["problem"], "chosen": r["solution"], "rejected": wrong}
        elif i % 3 == 1:
            row = {"prompt": [user], "chosen": r["solution"], "rejected": wrong}
        else:
            row = {"prompt": r["problem"], "chosen": [user, {"role": "assistant", "content": r["solution"]}],
                   "rejected": [user, {"role": "assistant", "content": wrong}]}
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    return path


def _args(model: Path, pairs: Path, *extra: str) -> list[str]:
    return ["--recipe", "quickstart-dpo", f"model.path={model}", f"data.source={pairs}", "data.eval_fraction=0.25",
            "train.micro_batch_size=4", "train.max_steps=80", "train.lr=1e-3", "train.eval_every_steps=40",
            "output.save_every_steps=5", "output.save_hf_checkpoints=false", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    return _write_pairs(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def dpo_run(tiny_model, pair_file, tmp_path_factory):
    from conftest import run_cli

    run = tmp_path_factory.mktemp("dpo") / "straight"
    result = run_cli("dpo", *_args(tiny_model, pair_file), "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, json.loads(result.stdout)


def test_dpo_trains_logs_and_writes_a_loadable_final(dpo_run):
    run, summary = dpo_run
    assert summary["steps"] == 80 and summary["loss_type"] == "sigmoid" and summary["reference"] == "cached"
    assert summary["data"]["pairs"] == 48 and summary["data"]["eval_pairs"] == 12
    metrics = _metrics(run)
    start = metrics[0]
    # step 0: the policy is the reference, evaluated in the micro-batches its reference was computed in: every
    # held-out margin is exactly 0 (accuracy 0: ties do not count), the loss is log 2
    assert start["step"] == 0 and start["eval_margin"] == 0.0 and start["eval_accuracy"] == 0.0
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    first, last = metrics[1], metrics[-1]
    # the recipe adds the chosen answers' token-mean NLL (dpo.sft_weight 1) to the preference loss
    assert first["step"] == 1 and first["preference_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["loss"] == pytest.approx(first["preference_loss"] + first["sft_nll"], abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "lr", "grad_norm"):
        assert key in first
    # one step's 4 pairs are noise (the NLL term dominates the update on a random model): the last 20 steps' mean
    # preference loss is below log 2 and their mean margin above 0 (measured 0.62 and +0.20)
    tail = metrics[-20:]
    assert last["step"] == 80 and last["sft_nll"] < first["sft_nll"]
    assert sum(m["preference_loss"] for m in tail) / 20 < math.log(2) - 0.02
    assert sum(m["rewards/margin"] for m in tail) / 20 > 0.03
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [0, 40, 80]
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"loss.png", "margin.png", "accuracy.png"}
    cache = json.loads((run / "reference_logps.json").read_text())
    assert cache["pairs"] == 48 and len(cache["logps"]) == 48

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size >= len(tokenizer) and tokenizer.chat_template


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(tiny_model, pair_file, dpo_run, cli, tmp_path):
    """kill -9 after the step-10 checkpoint, `--resume`: the reference cache is reused and the run ends where the
    uninterrupted one ends (fp32 on CPU: max abs weight difference <= 1e-6)."""
    straight, _ = dpo_run
    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "mathctl", "dpo", *_args(tiny_model, pair_file),
                                "--run-dir", str(killed)], stdout=log, stderr=log, env=dict(os.environ))
    marker = killed / "checkpoints" / "step_000010" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the kill came too late to be mid-run"

    resumed = cli("dpo", "--resume", "--run-dir", str(killed), "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 80
    assert "reference log-probs: 48 pairs from reference_logps.json" in resumed.stderr
    expected = load_file(straight / "final" / "model.safetensors")
    got = load_file(killed / "final" / "model.safetensors")
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6
    assert [m.get("loss") for m in _metrics(killed)] == pytest.approx([m.get("loss") for m in _metrics(straight)],
                                                                       abs=1e-6, nan_ok=True)


@pytest.mark.slow
def test_two_fsdp_processes_match_one_and_bf16_trains(tiny_model, pair_file, cli, tmp_path, capsys):
    """launch.num_processes=2 runs DPO under FSDP2 over gloo (accelerate launch). With the same 8 pairs a step (2
    processes x 4 vs 1 process x 4 x 2 accumulated), the preference loss is the mean over the step's pairs however
    they are split, so both runs log the same losses up to the order of fp32 reductions; the reference cache is
    computed across both ranks. bf16 mixed precision trains the same recipe to finite losses near fp32's."""
    common = _args(tiny_model, pair_file, "train.max_steps=6", "train.eval_every_steps=3", "output.save_every_steps=3",
                   "output.plots=false")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = cli("dpo", *common, "train.grad_accum_steps=2", "--run-dir", str(one), "--json")
    r2 = cli("dpo", *common, "train.grad_accum_steps=1", "launch.num_processes=2", "--run-dir", str(two), "--json")
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads(r2.stdout)["world_size"] == 2
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for key in ("loss", "preference_loss", "sft_nll", "rewards/margin", "eval_loss", "eval_margin"):
        want = [m[key] for m in a if key in m]
        got = [m[key] for m in b if key in m]
        # margins are beta x differences of summed log-probs of ~100 nats: fp32 sums in another order move them ~1e-6
        assert len(want) == len(got) > 0 and got == pytest.approx(want, rel=1e-5, abs=1e-5), key
    shards = sorted(p.name for p in (two / "checkpoints" / "step_000006" / "dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    x, y = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-4

    bf16 = tmp_path / "bf16"
    result = _in_process(capsys, "dpo", *common, "train.grad_accum_steps=2", "train.precision=bf16",
                         "--run-dir", str(bf16), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    c = _metrics(bf16)
    assert all(math.isfinite(m["loss"]) for m in c if "loss" in m)
    # bf16 compute rounds each log-prob to ~3 significant digits: the first step's losses agree to about 1e-2
    assert c[1]["loss"] == pytest.approx(a[1]["loss"], rel=2e-2)
    assert c[1]["preference_loss"] == pytest.approx(math.log(2), abs=2e-2)


def _in_process(capsys, *argv: str):
    from types import SimpleNamespace

    from mathctl.cli import main

    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_lora_reference_cached_equals_adapters_off(tiny_model, pair_file, tmp_path, capsys):
    """On a LoRA model the cached reference (computed once before training) and the adapters-off reference
    (recomputed every step from the base under the adapters) are the same: the runs agree on the held-out figures
    at step 0 and the first step's loss, and the base under the trained adapters still gives the cached numbers.
    (Later steps are not compared: Adam at this lr turns the ~1e-7 rounding difference between micro-batch
    layouts into visibly different weights within a few steps.)"""
    from mathctl import dpo
    from mathctl.core.config import ModelSpec
    from mathctl.models import load_tokenizer

    runs = {}
    for reference in ("cached", "adapters_off"):
        run = tmp_path / reference
        result = _in_process(capsys, "dpo", *_args(tiny_model, pair_file, "lora.enabled=true", "lora.r=4",
                                                   f"dpo.reference={reference}", "train.max_steps=4",
                                                   "train.lr=2e-2", "train.eval_every_steps=4",
                                                   "output.save_every_steps=null", "output.plots=false"),
                             "--run-dir", str(run), "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[reference] = run
    cached, off = _metrics(runs["cached"]), _metrics(runs["adapters_off"])
    assert not (runs["adapters_off"] / "reference_logps.json").exists()
    for a, b in zip(cached[:2], off[:2]):  # step 0 (held out) and step 1 (train)
        for key in ("loss", "rewards/chosen", "rewards/rejected", "eval_loss", "eval_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)

    # the base under the adapters the adapters_off run trained: adapters off give the cache, on they do not
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cache = json.loads((runs["cached"] / "reference_logps.json").read_text())["logps"]
    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_model), chat_template="chatml"))
    data = dpo.DPOData(source=str(pair_file))
    pairs, _ = dpo.encode_pairs(dpo.load_pair_rows(data), data, tokenizer, 256)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      runs["adapters_off"] / "final" / "adapter").eval()
    batch = dpo.collate_pairs(pairs[:8], tokenizer.pad_token_id)
    with torch.no_grad():
        on = torch.cat(dpo.pair_logprobs(model, batch, "cpu", 1024))
        with model.disable_adapter():
            off_values = torch.cat(dpo.pair_logprobs(model, batch, "cpu", 1024))
    want = torch.tensor([cache[str(p["id"])][0] for p in pairs[:8]] + [cache[str(p["id"])][1] for p in pairs[:8]])
    assert torch.allclose(off_values.double(), want.double(), atol=1e-4), (off_values - want).abs().max()
    assert (on - want).abs().max() > 1e-2  # the adapters did move: the check is not between two copies of the base


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1+1?", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2?", "chosen": "4"}\n',
     "line 2: no field 'rejected'"),
    ('{"prompt": "1+1?", "chosen": "2", "rejected": "3"}\n\n{"prompt": \n', "line 3: malformed JSON"),
    ('{"prompt": "1+1?", "chosen": [{"role": "user", "content": "x"}], "rejected": "3"}\n',
     "line 1: the chosen response must start with an assistant message"),
])
def test_bad_pair_file_exits_2_naming_file_and_line(tiny_model, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = _in_process(capsys, "dpo", *_args(tiny_model, bad), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and message in errors[0], result.stderr
    assert "hint:" in result.stderr


def test_data_pairs_from_graded_samples_and_resume(lively_model, tmp_path, capsys):
    """Sample 4 answers to 6 problems, grade them, pair right with wrong. A random model rarely answers right, so the
    golds are taken from a first run's answers (the samples of a problem depend only on the seed and the problem):
    the second run then has right and wrong answers to pair. A resume after a cut-off samples line writes the same."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": "0"}) + "\n" for i in range(6)))
    common = ["--recipe", "quickstart-pairs", f"model.path={lively_model}", "--n", "4", "--k", "2",
              "sampling.max_new_tokens=12", "pairs.chunk_problems=4"]
    first = _in_process(capsys, "data", "pairs", *common, f"data.source={problems}", "--run-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    golds = [next((s["extracted"] for s in r["samples"] if s["extracted"]), "none") for r in records]
    problems.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": g}) + "\n"
                                for i, g in enumerate(golds)))

    second = _in_process(capsys, "data", "pairs", *common, f"data.source={problems}", "--run-dir", str(tmp_path / "b"),
                         "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    records = [json.loads(line) for line in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "b" / "pairs.jsonl").read_text().splitlines()]
    assert summary["problems"] == 6 and summary["pairs"] == len(pairs) > 0
    assert summary["with_both"] + summary["all_correct"] + summary["all_wrong"] == 6
    assert summary["with_both"] == sum(0 < r["num_correct"] < 4 for r in records) == summary["problems_with_pairs"]
    by_index = {r["index"]: r for r in records}
    for pair in pairs:
        record = by_index[pair["problem_index"]]
        right = {s["text"] for s in record["samples"] if s["correct"]}
        wrong = {s["text"] for s in record["samples"] if not s["correct"]}
        assert pair["chosen"] in right and pair["rejected"] in wrong
        assert pair["prompt"][-1]["role"] == "user" and "What is" in pair["prompt"][-1]["content"]
    assert max(sum(p["problem_index"] == i for p in pairs) for i in range(6)) <= 2

    # a kill after the first chunk's pairs but inside its samples line: resume drops those pairs and redoes the chunk
    third = tmp_path / "c"
    shutil.copytree(tmp_path / "b", third)
    lines = (third / "samples.jsonl").read_text().splitlines()
    (third / "samples.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    resumed = _in_process(capsys, "data", "pairs", "--resume", "--run-dir", str(third), "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (third / "pairs.jsonl").read_text() == (tmp_path / "b" / "pairs.jsonl").read_text()
    assert json.loads(resumed.stdout)["pairs"] == summary["pairs"]
