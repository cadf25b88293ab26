"""`mathctl convert-ckpt`: bit-exact round trips, key surgery, LoRA merges, our own run checkpoints,
and every bad-input case as one error line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mathctl.convert import convert, parse_size
from mathctl.core.errors import CheckpointError, ConfigError

IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11]])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    return load_file(folder / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def model_dir(lively_model) -> Path:
    return lively_model


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500 and parse_size(123) == 123
    with pytest.raises(ConfigError, match="cannot read the size"):
        parse_size("lots")


def test_hf_dcp_hf_round_trip_is_bit_exact_and_sharded(model_dir, tmp_path):
    convert(model_dir, tmp_path / "dcp", fmt_to="dcp", progress_bar=False)
    assert (tmp_path / "dcp" / ".metadata").is_file()
    summary = convert(tmp_path / "dcp", tmp_path / "hf", shard_size="60KB", progress_bar=False)
    assert summary["from"] == "dcp" and summary["verified"]
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    assert _same(_weights(tmp_path / "hf"), _weights(model_dir))
    assert torch.equal(_logits(tmp_path / "hf"), _logits(model_dir))


def test_hf_pt_hf_round_trip_is_bit_exact(model_dir, tmp_path):
    convert(model_dir, tmp_path / "state.pt", fmt_to="torch", progress_bar=False)
    assert set(torch.load(tmp_path / "state.pt", weights_only=True)) == set(_weights(model_dir))
    convert(tmp_path / "state.pt", tmp_path / "hf", base_model=str(model_dir), progress_bar=False)
    assert _same(_weights(tmp_path / "hf"), _weights(model_dir))
    # a folder output keeps config and tokenizer beside model.pt, so the way back needs no --base-model
    convert(model_dir, tmp_path / "pt-folder", fmt_to="torch", progress_bar=False)
    convert(tmp_path / "pt-folder", tmp_path / "hf2", progress_bar=False)
    assert _same(_weights(tmp_path / "hf2"), _weights(model_dir))


def test_key_surgery_of_wrapped_state_dicts(model_dir, tmp_path):
    """DDP `module.`, torch.compile `_orig_mod.`, FSDP1 `_fsdp_wrapped_module.`, nesting under
    `state_dict`, a duplicate tied lm_head, a stale rotary buffer and bf16 -> fp32 are all handled."""
    weights = _weights(model_dir)
    wrapped = {}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[1] == "layers":
            parts.insert(3, "_fsdp_wrapped_module")
        wrapped["module._orig_mod." + ".".join(parts)] = value.to(torch.bfloat16)
    wrapped["module._orig_mod.lm_head.weight"] = weights["model.embed_tokens.weight"].to(torch.bfloat16)  # tied copy
    wrapped["module._orig_mod.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "ckpt.pt")
    summary = convert(tmp_path / "ckpt.pt", tmp_path / "hf", base_model=str(model_dir), dtype="fp32",
                      progress_bar=False)
    assert "state dict nested under 'state_dict'" in summary["notes"]
    assert "module._orig_mod.lm_head.weight" in summary["dropped"]
    got = _weights(tmp_path / "hf")
    assert sorted(got) == sorted(weights)
    assert all(torch.equal(got[k], weights[k].to(torch.bfloat16).to(torch.float32)) for k in weights)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"


def test_model_prefix_added_when_the_state_dict_is_the_inner_model(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    inner = AutoModelForCausalLM.from_pretrained(model_dir).model  # keys without the `model.` prefix
    torch.save(inner.state_dict(), tmp_path / "inner.pt")
    summary = convert(tmp_path / "inner.pt", tmp_path / "hf", base_model=str(model_dir), progress_bar=False)
    assert summary["missing"] == []  # lm_head is tied to the embedding here: nothing is missing
    assert _same(_weights(tmp_path / "hf"), _weights(model_dir))


def test_lora_adapter_merge_matches_base_plus_adapter(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero; give it weight so the merge matters
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        expected = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    summary = convert(tmp_path / "adapter", tmp_path / "merged", base_model=str(model_dir), progress_bar=False)
    assert summary["from"] == "lora" and len(summary["lora_merged"]) == 2 * 7  # 2 layers x 7 projections
    got = _logits(tmp_path / "merged")
    assert not torch.allclose(got, _logits(model_dir), atol=1e-3)  # the adapter changed the model ...
    assert torch.allclose(got, expected, atol=1e-5)  # ... exactly as peft applies it


def test_lora_reward_model_keeps_its_trained_head(tiny_model, tmp_path):
    """A LoRA reward model: peft keeps the `score` head (a `modules_to_save` module) twice, as
    `score.original_module` and the trained `score.modules_to_save.default`, and an adapter folder saves
    the trained one as plain `score.weight` beside the base's; both map to `score.weight`, and the
    trained head is written. A hand-made run folder (a DCP checkpoint of the peft state dict and the
    recipe's r/alpha) stands in for `mathctl rm` with LoRA, which costs a training run."""
    import torch.distributed.checkpoint as dcp
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.float32)
    base.save_pretrained(tmp_path / "rm-base")  # score.weight: the head before training
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["score"]))
    with torch.no_grad():  # "train": LoRA B away from zero, the head's trainable copy away from the original
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
        expected = peft_model(IDS).logits
    state = peft_model.state_dict()
    trained_head = state["base_model.model.score.modules_to_save.default.weight"]
    assert not torch.equal(trained_head, state["base_model.model.score.original_module.weight"])

    run = tmp_path / "run"
    dcp.save(state, checkpoint_id=str(run / "checkpoints" / "step_000001" / "dcp"))
    (run / "checkpoints" / "step_000001" / "COMPLETE").touch()
    (run / "recipe.yaml").write_text("step: rm\nlora:\n  enabled: true\n  r: 4\n  alpha: 8\n")
    summary = convert(run, tmp_path / "from-run", base_model=str(tmp_path / "rm-base"), progress_bar=False)
    assert "base_model.model.score.original_module.weight" in summary["dropped"]
    assert len(summary["lora_merged"]) == 2 * 2  # 2 layers x q_proj, v_proj

    peft_model.save_pretrained(tmp_path / "adapter")
    convert(tmp_path / "adapter", tmp_path / "from-adapter", base_model=str(tmp_path / "rm-base"), progress_bar=False)

    for out in ("from-run", "from-adapter"):
        assert torch.equal(_weights(tmp_path / out)["score.weight"], trained_head), out
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / out, dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(model(IDS).logits, expected, atol=1e-5), out


def test_any_modules_to_save_copy_wins_over_its_original(tmp_path):
    """The rule is by peft's naming, not by module: an embedding kept with `modules_to_save` is picked the
    same way; two plain tensors under one name are still an error."""
    from mathctl.convert import Entry, Source, make_plan

    def plan(*keys: str):
        entries = {k: Entry(k, (4, 2), torch.float32) for k in keys}
        return make_plan(Source("fsdp", tmp_path, entries, lambda ks: {}, lora={"scale": 1.0}), None)

    lora = ("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
            "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight")
    got = plan(*lora, "base_model.model.model.embed_tokens.original_module.weight",
               "base_model.model.model.embed_tokens.modules_to_save.default.weight")
    assert got.sources["model.embed_tokens.weight"] == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert got.dropped == ["base_model.model.model.embed_tokens.original_module.weight"]
    with pytest.raises(CheckpointError, match="two source tensors map to model.norm.weight"):
        plan(*lora, "base_model.model.model.norm.weight", "module.base_model.model.model.norm.weight")


def test_our_lora_sft_run_converts_to_its_merged_final(cli, model_dir, tmp_path):
    """A mathctl LoRA run: its last DCP checkpoint, merged with the run's r/alpha, equals final/."""
    from conftest import quick_overrides

    run = tmp_path / "run"
    result = cli("sft", *quick_overrides(model_dir, "lora.enabled=true", "lora.r=4", "lora.alpha=16",
                                         "train.max_steps=3", "output.save_every_steps=3"), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    summary = convert(run, tmp_path / "hf", fmt_from="fsdp", progress_bar=False)
    assert "checkpoint step_000003 of run run" in summary["notes"] and len(summary["lora_merged"]) == 14
    assert torch.allclose(_logits(tmp_path / "hf"), _logits(run / "final"), atol=1e-5)


def test_dry_run_lists_the_mapping_and_writes_nothing(model_dir, tmp_path):
    summary = convert(model_dir, tmp_path / "out", dry_run=True)
    assert summary["status"] == "dry-run" and not (tmp_path / "out").exists()
    rows = {r["source"]: r for r in summary["mapping"]}
    assert rows["model.embed_tokens.weight"]["shape"] == [512, 64] and rows["model.norm.weight"]["written"]
    assert summary["tied"] == ["lm_head.weight -> model.embed_tokens.weight"]


def test_missing_unexpected_and_mismatched_tensors(model_dir, tmp_path):
    weights = _weights(model_dir)
    partial = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="1 tensors missing.*model.norm.weight"):
        convert(tmp_path / "partial.pt", tmp_path / "a", base_model=str(model_dir), progress_bar=False)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a*"))
    summary = convert(tmp_path / "partial.pt", tmp_path / "b", base_model=str(model_dir), allow_missing=True,
                      progress_bar=False)
    assert summary["missing"] == ["model.norm.weight"] and "model.norm.weight" not in _weights(tmp_path / "b")
    torch.save({**weights, "model.extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="the model does not have: model.extra.weight"):
        convert(tmp_path / "extra.pt", tmp_path / "c", base_model=str(model_dir), progress_bar=False)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert(tmp_path / "extra.pt", tmp_path / "d", base_model="tiny:qwen2-small", progress_bar=False)


BAD = [
    (["convert-ckpt", "{tmp}/nope", "{tmp}/out"], "does not exist"),
    (["convert-ckpt", "{model}", "{tmp}/out", "--from", "keras"], "unknown source format"),
    (["convert-ckpt", "{model}", "{tmp}/out", "--to", "onnx"], "unknown target format"),
    (["convert-ckpt", "{model}", "{tmp}/out", "--dtype", "fp8"], "unknown dtype"),
    (["convert-ckpt", "{model}", "{tmp}/out", "--shard-size", "big"], "cannot read the size"),
    (["convert-ckpt", "{model}", "{tmp}/full"], "already exists"),
    (["convert-ckpt", "{model}"], "no DST given"),
    (["convert-ckpt", "{tmp}/bare.pt", "{tmp}/out"], "no config.json and no --base-model"),
    (["convert-ckpt", "{tmp}/pickled.pt", "{tmp}/out", "--base-model", "{model}"], "weights_only=True"),
    (["convert-ckpt", "{tmp}/notdcp", "{tmp}/out", "--from", "dcp"], "not a DCP checkpoint"),
    (["convert-ckpt", "{tmp}/notdcp", "{tmp}/out", "--from", "fsdp"], "not a mathctl checkpoint"),
    (["convert-ckpt", "{tmp}/bare.pt", "{tmp}/out", "--base-model", "tiny:qwen2-small"], "shape mismatches"),
]


def _in_process(capsys, *argv: str):
    """The CLI's own entry (`mathctl.cli.main`) in this process: exit code and stderr, as the console script
    would give them, without a second interpreter start per case (one case per test still runs as a
    subprocess)."""
    from types import SimpleNamespace

    from mathctl.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_bad_input_exits_2_with_one_line(cli, capsys, model_dir, tmp_path):
    torch.save(_weights(model_dir), tmp_path / "bare.pt")
    torch.save({"obj": Path("x")}, tmp_path / "pickled.pt")  # an arbitrary object: refused by weights_only
    (tmp_path / "notdcp").mkdir()
    (tmp_path / "notdcp" / "x.txt").write_text("not a checkpoint")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep me")
    for number, (args, message) in enumerate(BAD):
        argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model_dir)) for a in args]
        result = cli(*argv) if number == 0 else _in_process(capsys, *argv)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_cli_json_and_dry_run(cli, model_dir, tmp_path):
    result = cli("convert-ckpt", str(model_dir), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tensors"] == 26 and summary["status"] == "dry-run"
    result = cli("convert-ckpt", str(model_dir), str(tmp_path / "dcp"), "--to", "dcp", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["verified"] and summary["written_tensors"] == 26


def test_dcp_reader_reads_views_and_dtypes_exactly(tmp_path, monkeypatch):
    """Plain contiguous tensors are read straight into place; a transposed view (saved with its
    strides) and a tensor with a storage offset take the `dcp.load` path; both give exact values."""
    import warnings

    import torch.distributed.checkpoint as dcp

    import mathctl.convert.sources as cv  # the DCP reader's own module

    base = torch.randn(6, 4)
    state = {"plain": torch.randn(5, 3).to(torch.bfloat16), "transposed": base.T, "offset": torch.randn(20)[7:13],
             "ints": torch.arange(12, dtype=torch.int64).reshape(3, 4), "scalar": torch.tensor(3.5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    fast: list[bool] = []
    original = cv._read_saved_tensor_into
    monkeypatch.setattr(cv, "_read_saved_tensor_into", lambda *a: fast.append(original(*a)) or fast[-1])
    got = cv._dcp_reader(tmp_path / "dcp")(list(state))
    for key, value in state.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert fast.count(True) >= 3 and False in fast  # both paths were taken


def _gguf_file(path: Path, architecture: str) -> Path:
    """A small valid GGUF file (one F32 tensor) naming `architecture`."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_is_detected_by_extension_or_magic(tmp_path):
    from mathctl.convert import detect_format, read_gguf_header

    gguf = _gguf_file(tmp_path / "model.bin", "llama")  # GGUF bytes under another name
    assert detect_format(gguf) == "gguf"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert detect_format(tmp_path / "junk.gguf") == "gguf"  # and then refused by the reader
    header = read_gguf_header(gguf)
    assert header["architecture"] == "llama" and header["tensors"] == [
        {"name": "token_embd.weight", "shape": [8, 4], "type": "F32", "bytes": 128}]


def test_bad_gguf_input_exits_2_with_one_line(cli, capsys, tmp_path):
    """A file that is not GGUF (by name or by --from) and a GGUF of an architecture transformers cannot
    read: one error line and a hint each, nothing written."""
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    (tmp_path / "notes.txt").write_text("hello")
    _gguf_file(tmp_path / "odd.gguf", "nosucharch")
    cases = [([str(tmp_path / "junk.gguf"), str(tmp_path / "out")], "is not a GGUF file"),
             ([str(tmp_path / "notes.txt"), str(tmp_path / "out"), "--from", "gguf"], "is not a GGUF file"),
             ([str(tmp_path / "odd.gguf"), str(tmp_path / "out")], "cannot read GGUF architecture 'nosucharch'"),
             ([str(tmp_path / "odd.gguf"), "--dry-run"], "cannot read GGUF architecture 'nosucharch'")]
    for number, (args, message) in enumerate(cases):
        result = cli("convert-ckpt", *args) if number == 0 else _in_process(capsys, "convert-ckpt", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
        assert any(line.startswith("hint:") for line in result.stderr.splitlines()), args
    assert not (tmp_path / "out").exists()
