"""GRPO objective against hand-computed values, masking, prompt planning and weight export."""

from __future__ import annotations

import math

import pytest
import torch

from mathctl.grpo import (
    GRPOConfig,
    PromptPlan,
    aggregate,
    build_batch,
    completion_logprobs,
    engine_state_dict,
    group_advantages,
    token_losses,
)

# A 2-group toy batch (group size 2): rewards 1, 0 | 1, 1.
REWARDS = [1.0, 0.0, 1.0, 1.0]
# 4 completions of up to 3 tokens; lengths 3, 2, 1, 3.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
# log-ratio logp - logp_old per token (the padding slots hold junk that must not count)
LOG_RATIO = torch.tensor([[0.0, math.log(1.5), math.log(0.5)],
                          [math.log(0.5), math.log(1.5), 9.0],
                          [math.log(1.1), 7.0, -7.0],
                          [0.0, 0.0, 0.0]])


def test_group_advantages_by_hand():
    adv, flat = group_advantages(REWARDS, 2, scale=True)
    std = math.sqrt((0.5 ** 2 + 0.5 ** 2) / 1)  # unbiased std of (1, 0)
    assert adv == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0])
    assert flat == [False, False, True, True]
    adv, _ = group_advantages(REWARDS, 2, scale=False)  # Dr. GRPO: centred only
    assert adv == pytest.approx([0.5, -0.5, 0.0, 0.0])
    adv, _ = group_advantages([3.0, 1.0, 2.0, 0.0, 0.0, 6.0], 3, scale=False)
    assert adv == pytest.approx([1.0, -1.0, 0.0, -2.0, -2.0, 4.0])


def _terms(adv, eps_low=0.2, eps_high=0.28, beta=0.0, ref=None):
    old = torch.zeros(4, 3)
    return token_losses(LOG_RATIO.clone(), old, torch.tensor(adv), MASK, epsilon_low=eps_low, epsilon_high=eps_high,
                        beta=beta, ref_logps=ref)


def hand_per_token(a: float) -> list[list[float]]:
    """-min(r*A, clip(r, 0.8, 1.28)*A) per token, worked out by hand for A = (a, -a, 0, 0)."""
    return [
        [-a, -1.28 * a, -0.5 * a],   # r=1; r=1.5 clipped to 1.28 (A>0); r=0.5: unclipped 0.5A is the min
        [0.8 * a, 1.5 * a, 0.0],     # A<0: r=0.5 -> clip 0.8 gives the min -0.8A; r=1.5 -> -1.5A; pad
        [0.0, 0.0, 0.0],             # A=0
        [0.0, 0.0, 0.0],
    ]


def test_clipped_surrogate_per_token_by_hand():
    a = 0.7
    terms = _terms([a, -a, 0.0, 0.0])
    assert torch.allclose(terms["loss"], torch.tensor(hand_per_token(a)), atol=1e-6)
    # clipping is active on (0,1) (high side, A>0) and (1,0) (low side, A<0) only
    assert terms["clipped"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_aggregation_by_hand(loss_type):
    a = 0.7
    per = hand_per_token(a)
    terms = _terms([a, -a, 0.0, 0.0])
    got = float(aggregate(terms["loss"], MASK, loss_type, num_sequences=4, num_tokens=9, max_completion_len=5))
    if loss_type == "grpo":  # mean per completion, then over completions
        want = (sum(per[0]) / 3 + sum(per[1]) / 2 + 0 / 1 + 0 / 3) / 4
    elif loss_type == "dapo":  # every token of the step weighs the same
        want = (sum(per[0]) + sum(per[1])) / 9
    else:  # Dr. GRPO: a constant denominator, no length bias
        want = (sum(per[0]) + sum(per[1])) / (4 * 5)
    assert got == pytest.approx(want, abs=1e-6)


def test_k3_kl_term_by_hand():
    ref = torch.full((4, 3), math.log(2.0))  # ref - logp per token, with logp = LOG_RATIO (old = 0)
    terms = _terms([0.0, 0.0, 0.0, 0.0], beta=0.5, ref=ref)
    d = math.log(2.0) - 0.0  # token (0,0): logp = 0
    assert float(terms["kl"][0, 0]) == pytest.approx(math.exp(d) - d - 1)  # = 1 - log 2 = 0.3069
    d = math.log(2.0) - math.log(1.5)
    assert float(terms["loss"][0, 1]) == pytest.approx(0.5 * (math.exp(d) - d - 1), rel=1e-5)  # A = 0: only beta * KL
    assert float(terms["kl"][1, 2]) == 0.0  # masked
    with pytest.raises(ValueError):
        _terms([0.0] * 4, beta=0.1, ref=None)


def test_ratio_one_gradient_is_the_policy_gradient():
    """With logp_old = logp (one optimiser step per rollout), d loss / d logp = -A / tokens (dapo)."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    terms = token_losses(logps, logps.detach(), torch.tensor([2.0, -1.0]), mask, epsilon_low=0.2, epsilon_high=0.2)
    loss = aggregate(terms["loss"], mask, "dapo", num_sequences=2, num_tokens=3, max_completion_len=2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-(2.0 + 2.0 - 1.0) / 3)
    assert torch.allclose(logps.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]]))


def test_masked_tokens_do_not_touch_the_loss_or_gradient():
    logps = torch.tensor([[-1.0, 50.0]], requires_grad=True)  # the second token is padding
    mask = torch.tensor([[1.0, 0.0]])
    terms = token_losses(logps, torch.tensor([[-1.2, -80.0]]), torch.tensor([1.0]), mask, epsilon_low=0.2,
                         epsilon_high=0.2, beta=0.1, ref_logps=torch.tensor([[-1.0, 30.0]]))
    loss = aggregate(terms["loss"], mask, "grpo", num_sequences=1, num_tokens=1, max_completion_len=2)
    loss.backward()
    assert torch.isfinite(loss)
    assert float(logps.grad[0, 1]) == 0.0


def test_completion_logprobs_match_teacher_forcing_without_padding(lively_model):
    """Left-padded prompts and right-padded completions give each row exactly its own unpadded
    log-probabilities, and the completion mask covers the completion and nothing else."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_model).eval()
    items = [{"prompt_ids": [5, 6, 7, 8, 9], "completion_ids": [10, 11, 12]},
             {"prompt_ids": [13, 14], "completion_ids": [15, 16, 17, 18, 19]},
             {"prompt_ids": [20, 21, 22], "completion_ids": [23]}]
    batch = build_batch(items, pad_id=0, device=torch.device("cpu"))
    assert batch["completion_mask"].sum(-1).tolist() == [3, 5, 1]
    with torch.no_grad():
        logps, ent = completion_logprobs(model, batch, temperature=0.7, entropy=True)
        for r, it in enumerate(items):
            ids = torch.tensor([it["prompt_ids"] + it["completion_ids"]])
            logits = model(ids).logits[0].float() / 0.7
            expect = torch.log_softmax(logits, -1)
            p = len(it["prompt_ids"])
            want = [float(expect[p - 1 + j, tok]) for j, tok in enumerate(it["completion_ids"])]
            n = len(it["completion_ids"])
            assert logps[r, :n].tolist() == pytest.approx(want, abs=1e-4)
            probs = torch.softmax(logits[p - 1:p - 1 + n], -1)
            want_ent = (-(probs * torch.log_softmax(logits[p - 1:p - 1 + n], -1)).sum(-1)).tolist()
            assert ent[r, :n].tolist() == pytest.approx(want_ent, abs=1e-4)


def test_prompt_plan_covers_every_prompt_each_pass():
    plan = PromptPlan(10, 4, seed=3)
    first = [i for s in range(5) for i in plan.indices(s)]  # 20 = two passes
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]  # reshuffled per pass
    assert PromptPlan(10, 4, seed=3).indices(3) == plan.indices(3)  # deterministic: resume draws the same


def test_lora_weights_for_the_engine_are_the_merged_model(tiny_model):
    from transformers import AutoModelForCausalLM

    from mathctl.core.config import LoraSpec
    from mathctl.training import apply_lora

    spec = LoraSpec(enabled=True, r=4, alpha=8)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B != 0
    state = engine_state_dict(model, spec, distributed=False)
    merged = model.merge_and_unload().state_dict()
    assert set(state) == set(merged)
    worst = max(float((state[k] - merged[k]).abs().max()) for k in merged)
    assert worst < 1e-5


def test_config_checks():
    from pydantic import ValidationError

    base = {"model": {"path": "tiny:qwen2-tiny"}}
    cfg = GRPOConfig(**base)
    assert cfg.std_scaling and cfg.epsilon_high == 0.2
    assert not GRPOConfig(**base, grpo={"loss_type": "dr_grpo"}).std_scaling
    assert GRPOConfig(**base, grpo={"loss_type": "dr_grpo", "scale_rewards": "group"}).std_scaling
    with pytest.raises(ValidationError, match="multiple of"):
        GRPOConfig(**base, grpo={"prompts_per_step": 3}, launch={"num_processes": 2})
    with pytest.raises(ValidationError, match="mini_batches"):
        GRPOConfig(**base, grpo={"prompts_per_step": 1, "group_size": 3, "mini_batches": 2})
