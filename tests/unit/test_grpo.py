"""GRPO objective against hand-computed values, masking, prompt planning and weight export."""

from __future__ import annotations

import math

import pytest
import torch

from mathctl.grpo import (
    GRPOConfig,
    MismatchMeter,
    PromptPlan,
    aggregate,
    build_batch,
    completion_logprobs,
    engine_weights,
    group_advantages,
    importance_weights,
    resolve_is_correction,
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


# --- engine/trainer mismatch correction ------------------------------------------------------
# log(pi_old / pi_engine) per token of 3 completions (lengths 3, 2, 3); the padding slot holds junk.
IS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
IS_RATIO = [[1.5, 3.0, 0.25], [0.8, 0.6, math.exp(9.0)], [3.0, 1.0, 1.2]]
IS_LOG_RATIO = torch.tensor([[math.log(r) for r in row] for row in IS_RATIO])
# Hand-computed weights with cap 2 (and floor 0.5 for mis); padding gets 1. Sequence ratios are the
# products of the token ratios: 1.5 * 3 * 0.25 = 1.125, 0.8 * 0.6 = 0.48, 3 * 1 * 1.2 = 3.6.
IS_CASES = {
    ("tis", "token"): ([[1.5, 2.0, 0.25], [0.8, 0.6, 1.0], [2.0, 1.0, 1.2]],       # 3 -> 2 twice
                       [[0, 1, 0], [0, 0, 0], [1, 0, 0]]),
    ("mis", "token"): ([[1.5, 0.0, 0.0], [0.8, 0.6, 1.0], [0.0, 1.0, 1.2]],        # 3 > 2 and 0.25 < 0.5 dropped
                       [[0, 1, 1], [0, 0, 0], [1, 0, 0]]),
    ("tis", "sequence"): ([[1.125] * 3, [0.48, 0.48, 1.0], [2.0] * 3],             # 3.6 -> 2; 0.48 kept (no floor)
                          [[0, 0, 0], [0, 0, 0], [1, 1, 1]]),
    ("mis", "sequence"): ([[1.125] * 3, [0.0, 0.0, 1.0], [0.0] * 3],               # 0.48 < 0.5 and 3.6 > 2 dropped
                          [[0, 0, 0], [1, 1, 0], [1, 1, 1]]),
}


def _is_weights(mode, level, engine=None):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -4.0], [-0.2, -2.5, -1.1]])
    engine = old - IS_LOG_RATIO if engine is None else engine  # so that old - engine = IS_LOG_RATIO
    return importance_weights(old, engine, IS_MASK, mode=mode, level=level, cap=2.0, floor=0.5)


@pytest.mark.parametrize(("mode", "level"), list(IS_CASES))
def test_importance_weights_by_hand(mode, level):
    weights, hit = _is_weights(mode, level)
    want, want_hit = IS_CASES[mode, level]
    assert torch.allclose(weights, torch.tensor(want), atol=1e-6)
    assert hit.int().tolist() == want_hit
    assert not weights.requires_grad


@pytest.mark.parametrize(("mode", "level"), list(IS_CASES))
def test_weighted_gradient_by_hand(mode, level):
    """One optimiser step per rollout (logp_old = logp, ratio 1), dapo: d loss / d logp_t = -A w_t / tokens."""
    weights, _ = _is_weights(mode, level)
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -4.0], [-0.2, -2.5, -1.1]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    terms = token_losses(logps, logps.detach(), adv, IS_MASK, epsilon_low=0.2, epsilon_high=0.2, is_weights=weights)
    loss = aggregate(terms["loss"], IS_MASK, "dapo", num_sequences=3, num_tokens=8, max_completion_len=3)
    loss.backward()
    w = IS_CASES[mode, level][0]
    want = [[-adv[r].item() * w[r][t] * IS_MASK[r, t].item() / 8 for t in range(3)] for r in range(3)]
    assert torch.allclose(logps.grad, torch.tensor(want), atol=1e-6)
    want_loss = sum(-adv[r].item() * w[r][t] for r in range(3) for t in range(3) if IS_MASK[r, t]) / 8
    assert float(loss.detach()) == pytest.approx(want_loss, abs=1e-6)


def test_weights_scale_the_clipped_surrogate_not_the_kl():
    """Off-policy ratios (the LOG_RATIO toy, logp_old = 0) with tis weights: the gradient is -w r A on
    unclipped tokens and 0 on clipped ones; the KL term is the same with or without weights."""
    a = 0.7
    logps = LOG_RATIO.clone().requires_grad_(True)
    w = torch.tensor([[0.5, 2.0, 1.5], [0.25, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    terms = token_losses(logps, torch.zeros(4, 3), torch.tensor([a, -a, 0.0, 0.0]), MASK, epsilon_low=0.2,
                         epsilon_high=0.28, is_weights=w)
    assert torch.allclose(terms["loss"], w * torch.tensor(hand_per_token(a)), atol=1e-6)
    terms["loss"].sum().backward()
    r = LOG_RATIO.exp()
    # token (0,1) is clipped (r = 1.5 > 1.28, A > 0) and (1,0) too (r = 0.5 < 0.8, A < 0): no gradient
    want = [[-0.5 * r[0, 0] * a, 0.0, -1.5 * r[0, 2] * a], [0.0, 1.0 * r[1, 1] * a, 0.0], [0.0] * 3, [0.0] * 3]
    assert torch.allclose(logps.grad, torch.tensor(want), atol=1e-6)

    ref = torch.full((4, 3), math.log(2.0))
    plain = token_losses(LOG_RATIO, torch.zeros(4, 3), torch.zeros(4), MASK, epsilon_low=0.2, epsilon_high=0.28,
                         beta=0.5, ref_logps=ref)
    weighted = token_losses(LOG_RATIO, torch.zeros(4, 3), torch.zeros(4), MASK, epsilon_low=0.2, epsilon_high=0.28,
                            beta=0.5, ref_logps=ref, is_weights=w)
    assert torch.equal(weighted["loss"], plain["loss"])  # A = 0: only beta * KL, and it is not weighted


@pytest.mark.parametrize(("mode", "level"), list(IS_CASES))
def test_engine_equal_to_trainer_changes_nothing(mode, level):
    """Engine log-probs equal to the trainer's: every weight is 1 and the loss is today's, bit for bit."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -4.0], [-0.2, -2.5, -1.1]])
    weights, hit = importance_weights(old, old.clone(), IS_MASK, mode=mode, level=level, cap=2.0, floor=0.5)
    assert torch.equal(weights, torch.ones(3, 3)) and not hit.any()
    logps = old + torch.tensor([[0.1, -0.3, 0.05], [0.2, 0.0, 7.0], [-0.4, 0.3, 0.01]])
    adv = torch.tensor([1.5, -0.5, 0.3])
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        kwargs = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.1, ref_logps=old - 0.2)
        today = token_losses(logps, old, adv, IS_MASK, **kwargs)
        fixed = token_losses(logps, old, adv, IS_MASK, **kwargs, is_weights=weights)
        counts = dict(num_sequences=3, num_tokens=8, max_completion_len=3)
        assert torch.equal(aggregate(fixed["loss"], IS_MASK, loss_type, **counts),
                           aggregate(today["loss"], IS_MASK, loss_type, **counts))


def test_mismatch_meter_by_hand():
    """The logged gap is over every reported token (padding out); the weight statistics over tokens
    that carry loss, or once per completion at sequence level."""
    old = torch.zeros(3, 3)
    engine = -IS_LOG_RATIO
    active = IS_MASK.clone()
    active[2] = 0  # a completion without loss (filtered group): its gap counts, its weights do not
    gaps = [abs(math.log(r)) for row, m in zip(IS_RATIO, IS_MASK.tolist()) for r, on in zip(row, m) if on]
    meter = MismatchMeter()
    weights, hit = importance_weights(old, engine, IS_MASK, mode="tis", level="token", cap=2.0)
    meter.add(old, engine, IS_MASK, active, weights, hit)
    assert meter.gap_sum / meter.gap_tokens == pytest.approx(sum(gaps) / 8)
    assert meter.gap_max == pytest.approx(math.log(4.0))  # the 0.25 token
    assert meter.weight_count == 5 and meter.hits == 1
    assert meter.weight_sum / meter.weight_count == pytest.approx((1.5 + 2.0 + 0.25 + 0.8 + 0.6) / 5)
    assert (meter.weight_min, meter.weight_max) == pytest.approx((0.25, 2.0))
    seq = MismatchMeter()
    weights, hit = importance_weights(old, engine, IS_MASK, mode="mis", level="sequence", cap=2.0, floor=0.5)
    seq.add(old, engine, IS_MASK, IS_MASK, weights, hit, sequence=True)
    assert seq.weight_count == 3 and seq.hits == 2  # 0.48 and 3.6 dropped
    assert seq.weight_sum == pytest.approx(1.125)


def test_is_correction_resolves_by_backend():
    assert resolve_is_correction("auto", "vllm") == "tis"
    assert resolve_is_correction("auto", "hf") == "none"
    assert resolve_is_correction("mis", "hf") == "mis" and resolve_is_correction("none", "vllm") == "none"


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
    state = dict(engine_weights(model, spec))
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
    assert cfg.grpo.is_correction == "auto" and cfg.is_floor == 0.5  # 1 / is_cap
    assert GRPOConfig(**base, grpo={"is_correction": "mis", "is_floor": 0.0}).is_floor == 0.0
    with pytest.raises(ValidationError, match="is_correction=mis"):
        GRPOConfig(**base, grpo={"is_correction": "tis", "is_floor": 0.3})
    with pytest.raises(ValidationError, match="below grpo.is_cap"):
        GRPOConfig(**base, grpo={"is_correction": "mis", "is_cap": 2.0, "is_floor": 2.0})
    with pytest.raises(ValidationError, match="is_cap"):
        GRPOConfig(**base, grpo={"is_cap": 1.0})


def test_tensor_parallel_engines_must_divide_the_processes():
    from pydantic import ValidationError

    base = {"model": {"path": "tiny:qwen2-tiny"}, "grpo": {"prompts_per_step": 4}}
    GRPOConfig(**base, engine={"backend": "vllm", "tensor_parallel_size": 2}, launch={"num_processes": 4})
    GRPOConfig(**base, engine={"backend": "hf", "tensor_parallel_size": 2}, launch={"num_processes": 1})  # hf ignores it
    with pytest.raises(ValidationError, match="tensor_parallel_size=2 must divide launch.num_processes=1"):
        GRPOConfig(**base, engine={"backend": "vllm", "tensor_parallel_size": 2}, launch={"num_processes": 1})
