"""Loss masks, padding-free packing, schedules, step plans and launch scripts (no training runs)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from mathctl.core.config import LaunchConfig, ModelSpec, SlurmConfig, TrainBase
from mathctl.core.errors import ConfigError, DataError
from mathctl.core.launch import render_slurm
from mathctl.models import CHAT_TEMPLATES, resolve_chat_template
from mathctl.sft import (
    IGNORE,
    SFTTrain,
    collate,
    count_targets,
    token_nll_sum,
    tokenize_conversation,
)
from mathctl.training import StepPlan, lr_factor

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Ava has 3 apples and buys 4 more. How many?"},
    {"role": "assistant", "content": "3 + 4 = 7. The answer is \\boxed{7}."},
    {"role": "user", "content": "And if she then eats 2?"},
    {"role": "assistant", "content": "7 - 2 = 5. The answer is \\boxed{5}."},
]


def _trained_text(tokenizer, example) -> str:
    ids = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    return tokenizer.decode(ids)


def test_assistant_only_mask_covers_exactly_the_assistant_turns(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    example = tokenize_conversation(CONVERSATION, tokenizer, "assistant", 4096)
    trained = _trained_text(tokenizer, example)
    assert trained == ("3 + 4 = 7. The answer is \\boxed{7}.<|im_end|>\n"
                       "7 - 2 = 5. The answer is \\boxed{5}.<|im_end|>\n")
    assert "Ava" not in trained and "assistant" not in trained


def test_completion_mask_adds_the_assistant_header(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    example = tokenize_conversation(CONVERSATION, tokenizer, "completion", 4096)
    trained = _trained_text(tokenizer, example)
    assert trained.startswith("<|im_start|>assistant\n3 + 4 = 7.")
    assert trained.count("<|im_start|>assistant\n") == 2
    assert "Ava" not in trained


def test_all_mask_trains_every_token(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    example = tokenize_conversation(CONVERSATION, tokenizer, "all", 4096)
    assert IGNORE not in example["labels"]


@pytest.mark.parametrize("template", ["tulu", "rstar", "plain", "llama3"])
def test_other_templates_train_the_answer_and_end_token(tokenizer, template):
    tokenizer.chat_template = CHAT_TEMPLATES[template]
    example = tokenize_conversation(CONVERSATION[1:3], tokenizer, "assistant", 4096)
    trained = _trained_text(tokenizer, example)
    assert "\\boxed{7}" in trained and "Ava" not in trained
    if template != "llama3":
        assert tokenizer.eos_token in trained


def test_truncation_is_reported(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    example = tokenize_conversation(CONVERSATION, tokenizer, "assistant", 16)
    assert example["truncated"] and len(example["input_ids"]) == 16 and example["length"] > 16


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    # a template that renders turns in reverse order cannot give prefix spans
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(DataError, match="prefix"):
        tokenize_conversation(CONVERSATION[1:3], tokenizer, "assistant", 4096)


def test_tokenizer_without_template_needs_an_explicit_choice(tokenizer):
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(ConfigError, match="no chat template"):
            resolve_chat_template(ModelSpec(path="x/y", chat_template="tokenizer"), tokenizer)
        assert resolve_chat_template(ModelSpec(path="x/y", chat_template="chatml"), tokenizer) == CHAT_TEMPLATES["chatml"]
    finally:
        tokenizer.chat_template = saved


@pytest.mark.parametrize("attn", ["sdpa", "eager", "mathctl_varlen"])
def test_packed_loss_equals_padded_loss(tiny_model, tokenizer, attn):
    """Padding-free packing with a block-causal mask gives the padded loss (fp32, within 1e-5),
    and the same gradients."""
    from transformers import AutoModelForCausalLM

    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    torch.manual_seed(0)
    from mathctl import attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager" if attn == "eager" else "sdpa",
                                                 dtype=torch.float32)
    if attn == attention.NAME:
        model.set_attn_implementation(attention.register())
    with torch.no_grad():  # a fresh init attends almost uniformly; sharper weights make context matter
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.3)
    convs = [[{"role": "user", "content": f"Sam has {n} coins. How many?" + " More words." * n},
              {"role": "assistant", "content": f"Sam has {n} coins. The answer is \\boxed{{{n}}}."}] for n in (1, 7, 3, 12)]
    examples = [tokenize_conversation(c, tokenizer, "assistant", 512) for c in convs]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # different lengths: padding matters
    capacity = max(len(e["input_ids"]) for e in examples) + 60
    packed = collate(examples, packing=True, pad_id=tokenizer.pad_token_id, attn_implementation=attn, row_capacity=capacity)
    if attn == attention.NAME:
        assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one row, no padding
    else:
        assert 1 < packed["input_ids"].shape[0] < len(examples)  # rows that hold several samples, and padding
    losses, grads = [], []
    for packing in (False, True):
        model.zero_grad()
        batch = collate(examples, packing=packing, pad_id=tokenizer.pad_token_id, attn_implementation=attn,
                        row_capacity=capacity)
        loss = token_nll_sum(model, batch, torch.device("cpu")) / count_targets(examples)
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) <= 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    # a packed row with neither the block mask nor per-sample positions leaks context across samples,
    # so the equality above is not vacuous
    batch = packed
    leaky_batch = {"input_ids": batch["input_ids"], "targets": batch["targets"]}
    leaky = float(token_nll_sum(model, leaky_batch, torch.device("cpu"))) / count_targets(examples)
    assert abs(leaky - losses[0]) > 1e-3
    # position ids alone (no mask, no boundaries) isolate the samples too on sdpa/eager: transformers 5
    # detects packed rows from position ids when no KV cache is used (token_nll_sum passes use_cache=False)
    if attn != attention.NAME:
        positions_only = {k: batch[k] for k in ("input_ids", "targets", "position_ids")}
        loss = float(token_nll_sum(model, positions_only, torch.device("cpu"))) / count_targets(examples)
        assert abs(loss - losses[0]) <= 1e-5


def test_pack_rows_first_fit_decreasing():
    from mathctl.sft import pack_rows

    rows = pack_rows([5, 9, 3, 7, 1], capacity=10)
    assert rows == [[1, 4], [3, 2], [0]]  # 9+1 | 7+3 | 5: longest first, each into the first row it fits
    lengths = [5, 9, 3, 7, 1]
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert len(rows) == 3  # 25 tokens need at least 3 rows of 10


def test_lr_schedules():
    cosine = TrainBase(lr=1.0, lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 110, cosine) == pytest.approx(0.1)
    assert lr_factor(9, 110, cosine) == pytest.approx(1.0)
    assert lr_factor(60, 110, cosine) == pytest.approx(0.55)
    assert lr_factor(110, 110, cosine) == pytest.approx(0.1)
    linear = TrainBase(lr=1.0, lr_schedule="linear", warmup_ratio=0.1)
    assert lr_factor(55, 100, linear) == pytest.approx(0.5)
    assert lr_factor(100, 100, linear) == pytest.approx(0.0)
    constant = TrainBase(lr=1.0, lr_schedule="constant")
    assert lr_factor(50, 100, constant) == 1.0


def test_step_plan_splits_the_global_batch_the_same_for_any_world_size():
    one = StepPlan(100, SFTTrain(micro_batch_size=2, grad_accum_steps=4), world=1, seed=5)
    two = [StepPlan(100, SFTTrain(micro_batch_size=2, grad_accum_steps=2), world=2, seed=5) for _ in range(2)]
    for step in (0, 11, 12, 30):  # 12 steps per epoch: 12 and 30 are in later epochs
        single = sorted(i for mb in one.micro_batches(step, 0) for i in mb)
        split = sorted(i for r in range(2) for mb in two[r].micro_batches(step, r) for i in mb)
        assert single == split and len(single) == 8
    epoch0 = {i for s in range(12) for i in one.step_indices(s)}
    assert len(epoch0) == 96  # no sample twice within an epoch
    assert one.step_indices(0) != one.step_indices(12)  # a new order each epoch


def test_step_plan_refuses_too_little_data():
    with pytest.raises(ConfigError, match="fewer than one optimiser step"):
        StepPlan(3, SFTTrain(micro_batch_size=4), world=1, seed=0)


def test_slurm_script_is_valid_bash_with_per_node_rank(tmp_path):
    launch = LaunchConfig(num_processes=16, num_machines=2, slurm=SlurmConfig(partition="gpu", setup=["source .venv/bin/activate"]))
    script = render_slurm("sft", launch, tmp_path)
    path = tmp_path / "launch.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script
    assert "--num_processes 16" in script and "--num_machines 2" in script
    assert "--machine_rank $SLURM_NODEID" in script  # expands on each node
    assert "--main_process_ip ${MAIN_IP}" in script and "export MAIN_IP=$(scontrol show hostnames" in script
    assert f"-m mathctl.worker {tmp_path.resolve()}/recipe.yaml" in script
    # the per-node command is single-quoted, so $SLURM_NODEID is not expanded by sbatch's shell
    assert "bash -c '" in script


def test_slurm_node_command_expands_rank_per_node(tmp_path):
    import sys

    script = render_slurm("sft", LaunchConfig(num_processes=4, num_machines=2), tmp_path)
    node_line = next(line for line in script.splitlines() if line.startswith("srun"))
    inner = node_line.split("bash -c ", 1)[1].replace(sys.executable, "echo", 1)
    # what node 1 of the allocation would run, with `echo` standing in for python
    out = subprocess.run(["bash", "-c", f"export SLURM_NODEID=1 MAIN_IP=10.0.0.1 MAIN_PORT=29511; bash -c {inner}"],
                         capture_output=True, text=True, check=True).stdout
    assert "--machine_rank 1 " in out
    assert "--main_process_ip 10.0.0.1 --main_process_port 29511" in out
    assert "--num_processes 4 --num_machines 2" in out


def _labels_by_rule(ids, offsets, spans):
    """The labelling rule spelled out token by token (the reference for the bisection fast path)."""
    return [t if any(s <= a < e or (a == b and s < b <= e) for s, e in spans) else IGNORE
            for t, (a, b) in zip(ids, offsets)]


def _one_labelling_case(case):
    import random

    from mathctl.sft import label_tokens

    rng = random.Random(case)
    offsets, pos = [], 0
    for _ in range(rng.randint(0, 40)):  # contiguous tokens, some zero-width (special or empty tokens)
        width = 0 if rng.random() < 0.15 else rng.randint(1, 4)
        offsets.append((pos, pos + width))
        pos += width
    if case % 5 == 0 and len(offsets) > 2:  # offsets out of order: the general path
        rng.shuffle(offsets)
    ids = [rng.randint(0, 999) for _ in offsets]
    spans = sorted((a, a + rng.randint(0, 12)) for a in rng.sample(range(pos + 2), min(3, pos + 2)))
    spans = [s for i, s in enumerate(spans) if i == 0 or s[0] >= spans[i - 1][1]]  # disjoint, as turns are
    loss_on = "assistant"
    out = label_tokens(ids, offsets, spans, loss_on, 4096)
    assert out["labels"] == _labels_by_rule(ids, offsets, spans)
    assert out["input_ids"] == ids and out["length"] == len(ids) and not out["truncated"]


def test_label_tokens_fast_path_matches_the_rule():
    for case in range(300):  # random offsets with zero-width tokens; every fifth case shuffled (general path)
        _one_labelling_case(case)


def test_batched_backend_encoding_matches_the_tokenizer_call(tokenizer):
    from mathctl.sft import conversation_spans, label_tokens, tokenize_conversations

    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "ünïcode  spaces\\t and 3.14"},
                                               {"role": "assistant", "content": " lead space \\boxed{π}"}]]
    for loss_on in ("assistant", "completion", "all"):
        batched = tokenize_conversations(convs, tokenizer, loss_on, 4096)
        for conv, got in zip(convs, batched):
            text, spans = conversation_spans(conv, tokenizer, loss_on)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            assert got == label_tokens(enc["input_ids"], enc["offset_mapping"], spans, loss_on, 4096)
            assert got["input_ids"] == enc["input_ids"]


def test_slurm_script_of_engine_replicas_is_one_worker_with_their_gpus(tmp_path):
    from mathctl.core.config import EngineConfig

    script = render_slurm("mcts", LaunchConfig(num_processes=4), tmp_path, engine=EngineConfig(tensor_parallel_size=2),
                          one_worker=True)
    (tmp_path / "launch.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "launch.sbatch")]).returncode == 0
    assert "#SBATCH --nodes=1" in script and "#SBATCH --gpus-per-node=8" in script  # 4 replicas x 2 GPUs
    assert "accelerate" not in script and f"-m mathctl.worker {tmp_path.resolve()}/recipe.yaml" in script


def test_slurm_script_of_engine_replicas_on_several_nodes(tmp_path):
    """eval / mcts-sample over 2 nodes: each node runs `--node $SLURM_NODEID` with its share of the replicas'
    GPUs; the merge line follows srun, so `set -e` skips it when a node failed."""
    from mathctl.core.config import EngineConfig

    script = render_slurm("eval", LaunchConfig(num_processes=8, num_machines=2), tmp_path,
                          engine=EngineConfig(tensor_parallel_size=2), one_worker=True)
    (tmp_path / "launch.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "launch.sbatch")]).returncode == 0
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script  # 8 replicas / 2 nodes x 2 GPUs
    lines = script.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert "--nodes=2 --ntasks-per-node=1 bash -c '" in lines[at] and lines[at].endswith("--node $SLURM_NODEID'")
    assert lines[at + 1].endswith(f"-m mathctl.worker {tmp_path.resolve()}/recipe.yaml --merge-nodes")
    assert "set -euo pipefail" in script and "accelerate" not in script


def test_node_configs_split_problems_and_replicas():
    from mathctl.evaluate import EvalConfig
    from mathctl.evaluate import node_config as eval_node
    from mathctl.mcts_sample import MCTSConfig
    from mathctl.mcts_sample import node_config as mcts_node
    from mathctl.nodes import parse_node

    cfg = EvalConfig.model_validate({"model": {"path": "m"}, "eval": {"tasks": ["gsm8k"], "min_score": 0.5},
                                     "engine": {"tensor_parallel_size": 2},
                                     "launch": {"num_processes": 8, "num_machines": 2}})
    node = eval_node(cfg, 1, 2)
    assert node.eval.shard == "1/2" and node.replicas == 4 and node.launch.num_machines == 1
    assert node.eval.min_score is None and cfg.eval.shard is None  # the gate is the merged run's; cfg untouched
    mcts = MCTSConfig.model_validate({"model": {"path": "m"}, "launch": {"num_processes": 4, "num_machines": 2},
                                      "engine": {"data_parallel_size": 4}})
    sub = mcts_node(mcts, 0, 2)
    assert sub.data.shard == "0/2" and sub.replicas == 2 and sub.launch.num_machines == 1
    odd = EvalConfig.model_validate({"model": {"path": "m"}, "engine": {"data_parallel_size": 3},
                                     "launch": {"num_processes": 1}}).model_copy(update={"launch": LaunchConfig(
                                         num_processes=2, num_machines=2)})
    with pytest.raises(ConfigError, match="do not split evenly"):
        eval_node(odd, 0, 2)
    with pytest.raises(ConfigError, match="0..1"):
        parse_node("2", 2)
    with pytest.raises(ValueError, match="drop eval.shard"):
        EvalConfig.model_validate({"model": {"path": "m"}, "eval": {"shard": "0/2"},
                                   "launch": {"num_processes": 2, "num_machines": 2}})
    with pytest.raises(ValueError, match="both count the engine replicas of eval"):
        EvalConfig.model_validate({"model": {"path": "m"}, "engine": {"data_parallel_size": 4},
                                   "launch": {"num_processes": 2}})
    with pytest.raises(ValueError, match="neither --rounds"):
        MCTSConfig.model_validate({"model": {"path": "m"}, "rounds": {"count": 2},
                                   "launch": {"num_processes": 2, "num_machines": 2}})


def test_replica_gpu_groups(monkeypatch):
    from mathctl.replicas import device_groups, take_slice

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_groups(2, 2) == ["4,5", "6,7"] and device_groups(4, 1) == ["4", "5", "6", "7"]
    assert device_groups(2, 1, "cpu") == [None, None]
    with pytest.raises(ConfigError, match="need 6 GPUs; 4 are visible"):
        device_groups(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_groups(2, 1) == [None, None]  # no GPU: CPU replicas
    with pytest.raises(ConfigError, match="no GPU"):
        device_groups(2, 1, "cuda")
    rows = list(range(10))
    assert take_slice(take_slice(rows, "1/2"), "0/2") == [1, 5, 9] and take_slice(rows, None) == rows
