"""`mathctl convert-ckpt MODEL.gguf`: SmolLM2-135M-Instruct (Q4_1 GGUF) becomes a complete Hugging Face
folder, and that folder survives HF -> DCP -> HF bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.realmodel

IM_END = 2  # <|im_end|>: SmolLM2-Instruct's end of turn and its EOS


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


def test_gguf_becomes_a_complete_hf_folder(smollm2):
    from transformers import AutoTokenizer, GenerationConfig

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["hidden_size"] // config["num_attention_heads"] == 64 and config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert config["eos_token_id"] == IM_END and config["bos_token_id"] == 1
    assert "quantization_config" not in config and "gguf_file" not in json.dumps(config)
    weights = _weights(smollm2)
    assert len(weights) == 30 * 9 + 2 and "lm_head.weight" not in weights  # tied: written once
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert sum(t.numel() for t in weights.values()) == 134_515_008

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert len(tok) == 49152 and tok.convert_tokens_to_ids("<|im_end|>") == IM_END == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert GenerationConfig.from_pretrained(smollm2).eos_token_id == IM_END
    chat = [{"role": "user", "content": "What is 2+3?"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [1, 9690, 198] and ids.count(IM_END) == 2  # <|im_start|> system \n ; two turns closed
    assert tok.decode(tok("  12,345 + x^2")["input_ids"]) == "  12,345 + x^2"  # byte-level BPE round trip


def test_dry_run_lists_the_gguf_tensors_and_writes_nothing(cli, smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the staged config must not outlive the command
    result = cli("convert-ckpt", str(smollm2_gguf), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    gguf = summary["gguf"]
    assert summary["from"] == "gguf" and summary["status"] == "dry-run" and gguf["architecture"] == "llama"
    assert gguf["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and len(gguf["tensors"]) == 272
    assert {"name": "token_embd.weight", "shape": [49152, 576], "type": "Q8_0", "bytes": 30081024} in gguf["tensors"]
    assert {"name": "blk.0.attn_k.weight", "shape": [192, 576], "type": "Q4_1", "bytes": 69120} in gguf["tensors"]
    assert summary["tensors"] == 272 and summary["bytes"] == 134_515_008 * 4
    assert summary["tied"] == ["lm_head.weight -> model.embed_tokens.weight"]
    assert not list(tmp_path.glob("mathctl-gguf-*"))
    table = cli("convert-ckpt", str(smollm2_gguf), "--dry-run")
    assert table.returncode == 0 and "blk.29.ffn_down.weight" in table.stderr + table.stdout


def test_hf_dcp_hf_round_trip_is_bit_exact(smollm2, tmp_path):
    from mathctl.convert import convert

    convert(smollm2, tmp_path / "dcp", fmt_to="dcp", shard_size="200MB", progress_bar=False)
    summary = convert(tmp_path / "dcp", tmp_path / "hf", shard_size="200MB", progress_bar=False)
    assert summary["from"] == "dcp" and summary["verified"]
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) == 3
    original, back = _weights(smollm2), _weights(tmp_path / "hf")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (smollm2 / "tokenizer.json").read_text()

    def settings(path):  # the writer's transformers version aside: the cached folder may come from .venv-vllm's
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "transformers_version"}

    assert settings(tmp_path / "hf" / "generation_config.json") == settings(smollm2 / "generation_config.json")
    assert settings(tmp_path / "hf" / "config.json") == settings(smollm2 / "config.json")
