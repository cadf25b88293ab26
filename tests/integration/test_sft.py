"""`mathctl sft` end to end on a tiny model through the real CLI, and every bad input it must refuse."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
import yaml
from conftest import quick_overrides as quick
from safetensors.torch import load_file

from mathctl.cli import main


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one `error:` line naming the problem, a hint, no traceback."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert any(line.startswith("hint:") for line in result.stderr.splitlines())
    for needle in needles:
        assert needle in errors[0], errors[0]


# --- the happy paths --------------------------------------------------------------------------
def test_help_and_version(capsys):
    for argv in (["--help"], ["sft", "--help"], ["tiny-model", "--help"], ["data", "--help"], ["data", "synthetic", "--help"],
                 ["grade", "--help"]):
        assert main(argv) == 0, argv
    assert main(["--version"]) == 0
    assert "mathctl 0." in capsys.readouterr().out


def test_sft_full_run(cli, tiny_model, tmp_path):
    run = tmp_path / "run"
    result = cli("sft", *quick(tiny_model), "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert torch.isfinite(torch.tensor(summary["train_loss"])) and summary["eval_loss"] is not None

    # the run folder
    for name in ("recipe.yaml", "meta.json", "metrics.jsonl", "summary.json", "chat_template.jinja", "plots/loss.png"):
        assert (run / name).is_file(), name
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["model"]["path"] == str(tiny_model) and recipe["train"]["max_steps"] == 6
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["versions"]["torch"] and meta["seeds"]["train"] == 42
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert "eval_loss" in metrics[2] and "eval_loss" in metrics[5]
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # lr 1e-2 on a tiny model: the loss must fall
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_000003", "step_000006"]
    for name in checkpoints:
        assert (run / "checkpoints" / name / "COMPLETE").is_file()
        assert (run / "checkpoints" / name / "hf" / "model.safetensors").is_file()

    # final/ is a Hugging Face folder that loads, with the recorded chat template, and every weight trained
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.chat_template == (run / "chat_template.jinja").read_text()
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(run / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_sft_lora_merges_into_final(cli, tiny_model, tmp_path):
    run = tmp_path / "lora"
    result = cli("sft", *quick(tiny_model, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.lr=5e-2"),
                 "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, run / "final" / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits, atol=1e-4)


def test_sft_bf16_checkpointing_padded_messages_file(cli, tiny_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"}]} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "bf16"
    result = cli("sft", *quick(tiny_model, f"data.source={data}", "data.eval_rows=4", "train.precision=bf16",
                               "train.gradient_checkpointing=true", "train.packing=false", "train.loss_on=completion",
                               "train.lr_schedule=linear", "train.grad_accum_steps=2"),
                 "--run-dir", str(run), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["data"]["rows"] == 40 and summary["data"]["eval_rows"] == 4
    assert torch.isfinite(torch.tensor(summary["train_loss"]))


def test_dry_run_prints_resolved_recipe_and_writes_nothing(tmp_path, capsys):
    assert main(["sft", "--recipe", "quickstart-sft", "train.lr=0.25", "--run-dir", str(tmp_path / "x"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["train"]["lr"] == 0.25 and resolved["launch"]["num_processes"] == 1
    assert not (tmp_path / "x").exists()
    # the attention kernel by compute precision: fp32 never gets flash-attn
    assert "# attention: sdpa (fp32 compute) on a CUDA GPU, sdpa (fp32 compute) on CPU" in out
    assert main(["sft", "--recipe", "quickstart-sft", "train.precision=bf16", "--dry-run", "--json"]) == 0
    attention = json.loads(capsys.readouterr().out)["attention"]
    assert attention["cpu"] == "sdpa (bf16 compute)" and attention["cuda"].endswith("(bf16 compute)")
    code = main(["sft", "--recipe", "quickstart-sft", "model.attn_implementation=flash_attention_2", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "needs bf16 or fp16 compute" in err and "hint:" in err


def test_attention_follows_the_compute_precision():
    from mathctl.models import pick_attn_implementation

    assert pick_attn_implementation("auto", "cuda", "fp32") == "sdpa"
    assert pick_attn_implementation("auto", "cpu", "bf16") == "sdpa"
    try:
        import flash_attn  # noqa: F401
        flash = "flash_attention_2"
    except ImportError:
        flash = "sdpa"
    assert pick_attn_implementation("auto", "cuda", "bf16") == flash
    assert pick_attn_implementation("eager", "cuda", "fp32") == "eager"


def test_slurm_writes_a_valid_script(tmp_path, capsys):
    run = tmp_path / "slurm"
    code = main(["sft", "--recipe", "quickstart-sft", "launch.num_processes=16", "launch.num_machines=2",
                 "--run-dir", str(run), "--slurm", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    script = Path(summary["sbatch"])
    assert script.is_file() and subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--machine_rank $SLURM_NODEID" in script.read_text()
    assert (run / "recipe.yaml").is_file()


def test_tiny_model_and_synthetic_commands(cli, tmp_path):
    result = cli("tiny-model", str(tmp_path / "m"), "--preset", "llama-tiny", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["preset"] == "llama-tiny"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and (tmp_path / "m" / "tokenizer.json").is_file()
    assert main(["data", "synthetic", str(tmp_path / "s.jsonl"), "-n", "5", "--ops", "+-*"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all("\\boxed{" in r["solution"] for r in rows)


# --- bad input: exit 2, one line, no traceback -----------------------------------------------
def test_missing_recipe(cli):
    assert_user_error(cli("sft", "--recipe", "quickstart-sfx"), "unknown recipe 'quickstart-sfx'")


def test_unknown_key(cli):
    assert_user_error(cli("sft", "--recipe", "quickstart-sft", "train.lrr=0.1"), "train.lrr", "did you mean train.lr?")


def test_unknown_key_in_file_names_the_file(cli, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: {path: tiny:qwen2-tiny}\ndata: {source: synthetic}\nlaunch: {num_procs: 2}\n")
    assert_user_error(cli("sft", "--recipe", str(recipe)), "launch.num_procs", str(recipe), "launch.num_processes")


def test_wrong_type(cli):
    assert_user_error(cli("sft", "--recipe", "quickstart-sft", "train.max_steps=lots"), "train.max_steps", "'lots'")


def test_missing_model_folder(cli, tmp_path):
    result = cli("sft", "--recipe", "quickstart-sft", "--model", str(tmp_path / "no-model"), "--run-dir", str(tmp_path / "r"))
    assert_user_error(result, "no-model", "does not exist")
    assert not (tmp_path / "r").exists()  # checked before the run folder is made


def test_malformed_data_line(cli, tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1?", "solution": "\\\\boxed{2}"}\n{"problem": "2+2?", "solution": \n'
                    '{"problem": "3+3?", "solution": "6"}\n')
    result = cli("sft", *quick(tiny_model, f"data.source={data}"), "--run-dir", str(tmp_path / "r"))
    assert_user_error(result, "line 2", str(data))
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["status"] == "failed"


def test_output_folder_not_writable(cli, tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_user_error(cli("sft", *quick(tiny_model), "--run-dir", str(blocker / "run")), "cannot write output folder")


def test_non_empty_run_folder_needs_resume(cli, tiny_model, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    assert_user_error(cli("sft", *quick(tiny_model), "--run-dir", str(run)), "not empty")
    assert (run / "keep.txt").read_text() == "precious"


def test_resume_with_a_different_recipe_is_refused(cli, tiny_model, tmp_path):
    run = tmp_path / "r"
    assert main(["sft", *quick(tiny_model, "train.max_steps=1"), "--run-dir", str(run)]) == 0
    assert_user_error(cli("sft", *quick(tiny_model, "train.lr=0.5"), "--run-dir", str(run), "--resume"), "differs")
