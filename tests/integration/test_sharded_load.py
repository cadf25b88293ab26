"""Sharded loading (training.prepare_model) on 2 FSDP2 processes over gloo: each rank reads only its rows from
the safetensors files, and ends with exactly the weights, buffers and logits of a full load sharded afterwards.

The test starts this file as a script twice (ranks 0 and 1); every case runs in the same two processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_load_matches_a_full_load(tiny_model, tmp_path):
    """Cases: the tiny causal LM (tied embeddings) with gradient checkpointing; with LoRA; a reward model with a
    new score head, without and with LoRA (peft's modules_to_save copy of the head); a bf16 checkpoint split
    over an index; a frozen reference model; a .bin checkpoint, which falls back to the full load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    split = tmp_path / "bf16-split"
    model.to(torch.bfloat16).save_pretrained(split, max_shard_size="100KB")
    tokenizer.save_pretrained(split)
    assert (split / "model.safetensors.index.json").is_file()
    legacy = tmp_path / "bin"
    legacy.mkdir()
    model.config.save_pretrained(legacy)
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), legacy / "pytorch_model.bin")
    tokenizer.save_pretrained(legacy)

    port = str(_free_port())
    out = tmp_path / "result.json"
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's mathctl, whatever is installed
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, __file__, str(tiny_model), str(split), str(legacy), str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    for case, facts in result.items():
        assert facts["path"] == ("full" if case == "bin" else "sharded"), case
        assert facts["mismatched"] == [], (case, facts["mismatched"][:5])
        assert facts["logits_equal"], case
    assert result["causal"]["tied"] and result["lora"]["tied"]
    assert result["lora"]["lora_params"] > 0 and result["rm_lora"]["lora_params"] > 0
    assert result["reference"]["trainable"] == 0
    assert "not a safetensors checkpoint" in logs[0]


def _worker(tiny: str, split: str, legacy: str, out: str) -> None:
    import contextlib
    import io

    import torch

    from mathctl import models, training
    from mathctl.core.config import LaunchConfig, LoraSpec, ModelSpec, TrainBase
    from mathctl.rm import load_reward_model

    torch.set_num_threads(1)
    launch = LaunchConfig(num_processes=2)
    dist = training.init_distributed(launch)
    train = TrainBase(gradient_checkpointing=True)
    lora = LoraSpec(enabled=True, r=4, alpha=8)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 11, 3]])

    def full_of(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def case(path: str, spec_lora: LoraSpec, *, rm: bool = False, frozen: bool = False) -> dict:
        spec = ModelSpec(path=path, chat_template="chatml")
        tokenizer = models.load_tokenizer(spec)

        def build(empty: bool):
            if rm:
                return load_reward_model(spec, tokenizer, seed=3, init_std=0.5, empty=empty)
            return models.load_causal_lm(spec, empty=empty)

        task = "SEQ_CLS" if rm else "CAUSAL_LM"
        got = training.prepare_model(build, spec, train, spec_lora, launch, dist, task_type=task, frozen=frozen)
        sharded = training._load_sharded(build, spec, train, spec_lora, launch, dist, task_type=task, frozen=frozen)
        # the load before this change: every rank loads in full, adapts, then shards
        want = build(False)
        want = want.requires_grad_(False).eval() if frozen else training.adapt_model(want, train, spec_lora, dist.device,
                                                                                      task_type=task)
        want = training.shard_model(want, launch, train, dist)
        got_state, want_state = got.state_dict(), want.state_dict()
        mismatched = sorted(set(got_state) ^ set(want_state))
        mismatched += [k for k in want_state if k in got_state and not torch.equal(full_of(got_state[k]), full_of(want_state[k]))]
        got_buffers, want_buffers = dict(got.named_buffers()), dict(want.named_buffers())
        mismatched += [k for k in want_buffers if not torch.equal(got_buffers[k], want_buffers[k])]
        got.eval(), want.eval()
        with torch.no_grad():
            logits_equal = torch.equal(got(ids).logits, want(ids).logits)
        inner = got.get_base_model() if hasattr(got, "get_base_model") else got
        tied = getattr(inner, "lm_head", None) is not None and inner.lm_head.weight is inner.model.embed_tokens.weight
        return {"path": "sharded" if sharded is not None else "full", "mismatched": mismatched,
                "logits_equal": logits_equal, "tied": tied,
                "lora_params": sum(1 for k in got_state if "lora_" in k),
                "trainable": sum(p.numel() for p in got.parameters() if p.requires_grad)}

    no_lora = LoraSpec()
    results = {
        "causal": case(tiny, no_lora),
        "lora": case(tiny, lora),
        "rm": case(tiny, no_lora, rm=True),
        "rm_lora": case(tiny, lora, rm=True),
        "bf16_split": case(split, no_lora),
        "reference": case(tiny, no_lora, frozen=True),
        "bin": case(legacy, no_lora),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        training.close_distributed(dist)
    if dist.is_main:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
