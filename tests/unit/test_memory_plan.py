"""The `--dry-run` memory plan: parameter counts exact against transformers and peft, parts that scale
with the recipe as the plan says, and the CLI's comment lines, JSON field and warning."""

from __future__ import annotations

import json

import pytest

from mathctl.cli import main
from mathctl.core.config import load_recipe
from mathctl.memory_plan import GIB, architecture_from_config, lora_parameters, plan_memory, read_architecture
from mathctl.worker import step_module

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 101}


def _config(family: str, **extra):
    from transformers import LlamaConfig, Qwen2Config

    return (Qwen2Config if family == "qwen2" else LlamaConfig)(**{**SMALL, **extra})


@pytest.mark.parametrize("family,extra", [
    ("qwen2", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"head_dim": 32}),  # heads x head_dim (128) differs from hidden_size (64)
])
def test_parameter_count_matches_transformers(family, extra):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _config(family, **extra)
    arch = architecture_from_config(config.to_dict())
    causal = AutoModelForCausalLM.from_config(config)
    assert arch.parameters("lm") == sum(p.numel() for p in causal.parameters())
    config.num_labels = 1  # mathctl rm's model: one score
    reward = AutoModelForSequenceClassification.from_config(config)
    assert arch.parameters("score") == sum(p.numel() for p in reward.parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["self_attn.o_proj", "down_proj"],
                                     r".*\.(k_proj|up_proj)"])
def test_lora_count_matches_peft(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mathctl.core.config import LoraSpec

    config = _config("qwen2")
    lora = LoraSpec(enabled=True, r=4, target_modules=targets)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    counted, unmatched = lora_parameters(architecture_from_config(config.to_dict()), lora)
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad) and unmatched == []


def _saved_bytes_per_token(layers: int, mode: str, tokens: int = 512) -> float:
    """Bytes of the activations a transformers Qwen2 forward saves for backward, per token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config("qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if mode == "bf16 weights":  # what FSDP2's bf16 mixed precision computes with
        model = model.to(torch.bfloat16)
    saved: dict[int, int] = {}

    def keep(tensor):
        if tokens in tensor.shape:  # activations; parameters and autocast's weight casts have no token axis
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        model.model(input_ids=torch.randint(0, 1000, (1, tokens)), use_cache=False)
    return sum(saved.values()) / tokens


@pytest.mark.parametrize("mode,compute", [("fp32", 4), ("bf16 weights", 2), ("autocast", 2)])
def test_activation_estimate_matches_saved_tensors(mode, compute):
    from mathctl.memory_plan import activation_bytes_per_token

    measured = _saved_bytes_per_token(2, mode) - _saved_bytes_per_token(1, mode)  # one decoder layer
    arch = architecture_from_config(_config("qwen2", hidden_size=256, intermediate_size=704, num_attention_heads=8,
                                            num_key_value_heads=2).to_dict())
    estimate = activation_bytes_per_token(arch, compute, autocast=mode == "autocast")
    assert estimate == pytest.approx(measured, rel=0.01)  # left out: attention's logsumexp, RMSNorm's rsqrt


def test_architecture_from_a_folder_a_tiny_preset_and_the_table(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from mathctl.core.config import ModelSpec

    _config("llama").save_pretrained(tmp_path)  # a folder with config.json only: no weights needed
    arch, source = read_architecture(ModelSpec(path=str(tmp_path)))
    assert source == "config.json" and arch.model_type == "llama"
    built = AutoModelForCausalLM.from_pretrained(tiny_model)
    arch, source = read_architecture(ModelSpec(path="tiny:qwen2-tiny"))  # without building it
    assert source == "tiny preset" and arch.parameters() == sum(p.numel() for p in built.parameters())
    arch, source = read_architecture(ModelSpec(path="Qwen/Qwen2.5-Math-7B"))
    assert source in ("published config", "config.json") and round(arch.parameters() / 1e9, 2) == 7.62
    arch, reason = read_architecture(ModelSpec(path=str(tmp_path / "missing")))
    assert arch is None and "does not exist" in reason


def _plan(step: str, recipe: str, *overrides: str):
    _, config_cls = step_module(step)
    cfg, _ = load_recipe(step, config_cls, recipe, ["launch.gpu_memory_gb=80", *overrides])
    return plan_memory(step, cfg)


def test_sharded_parts_halve_when_processes_double():
    eight = _plan("sft", "rstar-sft", "launch.num_processes=8", "train.grad_sync=every")
    sixteen = _plan("sft", "rstar-sft", "launch.num_processes=16", "train.grad_sync=every")
    for part in ("gradients", "optimiser"):
        assert sixteen.parts[part] == pytest.approx(eight.parts[part] / 2)
    master = [p.parts["parameters"] - p.gathered for p in (eight, sixteen)]
    assert master[1] == pytest.approx(master[0] / 2) and master[0] == pytest.approx(4 * eight.parameters / 8)
    assert sixteen.parts["activations"] == eight.parts["activations"]  # per micro-batch, not sharded
    ddp = _plan("sft", "rstar-sft", "launch.preset=ddp")
    assert ddp.parts["optimiser"] == 8 * ddp.parameters and ddp.parts["gradients"] == 8 * ddp.parameters  # + buckets


def test_grad_sync_last_keeps_unsharded_gradients():
    last = _plan("sft", "rstar-sft", "train.grad_sync=last", "train.grad_accum_steps=4")
    assert last.parts["gradients"] == 4 * last.parameters and any("unsharded" in n for n in last.notes)
    one = _plan("sft", "rstar-sft", "train.grad_sync=last", "train.grad_accum_steps=1")
    assert one.parts["gradients"] == pytest.approx(4 * one.parameters / 8)


def test_logits_chunk_and_checkpointing():
    full = _plan("sft", "rstar-sft", "train.logits_chunk_tokens=null")
    tokens = 4 * 2048  # micro_batch_size x max_seq_len
    assert full.parts["logits"] == tokens * 152064 * 12
    chunked = _plan("sft", "rstar-sft", "train.logits_chunk_tokens=1024")
    assert chunked.parts["logits"] == 1024 * 152064 * 12
    on = _plan("sft", "rstar-sft", "train.gradient_checkpointing=true")
    assert on.parts["activations"] == full.activations_other and on.activations_other == full.parts["activations"]
    assert on.parts["activations"] < full.parts["activations"] / 5


def test_grpo_reference_engine_and_lora():
    plan = _plan("grpo", "deepscaler-grpo")
    assert plan.parts["reference"] == 4 * plan.parameters / 8  # beta > 0 without LoRA: an fp32 copy, sharded
    assert plan.parts["engine"] == pytest.approx(0.8 * 80 * GIB) and plan.engine_kept == 0  # asleep while training
    assert plan.rollouts == pytest.approx(4 * plan.parameters / 8 + plan.parts["optimiser"] + plan.parts["reference"]
                                          + plan.parts["engine"])
    lora = _plan("grpo", "gsm8k-grpo-lora")
    assert lora.parts["reference"] == 0 and lora.trainable < lora.parameters / 10
    assert lora.parts["optimiser"] == pytest.approx(8 * lora.trainable / 2)
    awake = _plan("grpo", "deepscaler-grpo", "engine.sleep_mode=false")
    assert awake.total == pytest.approx(plan.total + awake.parts["engine"]) and awake.fits is False


def test_dry_run_json_has_memory(capsys):
    assert main(["sft", "--recipe", "quickstart-sft", "launch.gpu_memory_gb=80", "--dry-run", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["known"] and memory["fits"] is True and memory["gpu_gib"] == 80
    assert set(memory["bytes"]) >= {"parameters", "gradients", "optimiser", "activations", "logits", "reference",
                                    "engine", "total"}
    assert memory["bytes"]["total"] == sum(memory["bytes"][k] for k in ("parameters", "gradients", "optimiser",
                                                                        "activations", "logits", "reference"))


def test_dry_run_warns_when_it_cannot_fit(capsys):
    assert main(["sft", "--recipe", "rstar-sft", "launch.gpu_memory_gb=1", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "# memory per GPU (8 processes, FSDP2 over 8): parameters" in captured.out
    assert "# warning: the plan needs" in captured.out and "warning: the plan needs" in captured.err


def test_dry_run_unknown_model_and_other_steps(capsys):
    assert main(["sft", "--recipe", "instella-math-stage2", "--dry-run"]) == 0
    assert "# memory per GPU: not planned, unknown architecture" in capsys.readouterr().out
    assert main(["mcts-sample", "--recipe", "quickstart-mcts", "--dry-run", "--json"]) == 0
    assert "memory" not in json.loads(capsys.readouterr().out)
