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
    batch_whiten,
    build_batch,
    completion_logprobs,
    engine_weights,
    group_advantages,
    importance_weights,
    overlong_penalties,
    pick_groups,
    resolve_is_correction,
    rewards_equal,
    rollout_seed,
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



# --- advantage estimators --------------------------------------------------------------------


def test_rloo_advantages_by_hand():
    """r - mean of the other G - 1 rewards; no std, whatever `scale` says."""
    adv, flat = group_advantages([3.0, 1.0, 2.0, 0.0, 0.0, 6.0], 3, scale=True, estimator="rloo")
    # 3 - (1 + 2) / 2, 1 - (3 + 2) / 2, 2 - (3 + 1) / 2 | 0 - (0 + 6) / 2 twice, 6 - (0 + 0) / 2
    assert adv == pytest.approx([1.5, -1.5, 0.0, -3.0, -3.0, 6.0])
    assert flat == [False] * 6
    adv, flat = group_advantages(REWARDS, 2, scale=False, estimator="rloo")
    assert adv == pytest.approx([1.0, -1.0, 0.0, 0.0])  # G = 2: the other completion's reward is the baseline
    assert flat == [False, False, True, True]


# REINFORCE++-baseline toy: 3 groups of 2, completion lengths in tokens
RPP_REWARDS = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0]
RPP_LENGTHS = [2, 1, 3, 1, 4, 2]


def _whitened_by_hand(centred, lengths, keep):
    """Every kept completion's centred reward repeated once per token; mean and unbiased std of that list."""
    import statistics

    tokens = [c for c, n, k in zip(centred, lengths, keep) for _ in range(n) if k]
    mu, var = statistics.fmean(tokens), statistics.variance(tokens)
    return [(c - mu) / math.sqrt(var + 1e-8) for c in centred]


def test_reinforce_pp_advantages_by_hand():
    centred, flat = group_advantages(RPP_REWARDS, 2, scale=True, estimator="reinforce_pp")
    assert centred == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.25, -0.25])  # group mean only, `scale` ignored
    # 13 tokens: 0.5 x2, -0.5, 0 x4, 0.25 x4, -0.25 x2 -> mu = 1/13, var = (1.125 - 13 mu^2) / 12
    mu, var = 1 / 13, (1.125 - 1 / 13) / 12
    got = batch_whiten(centred, [float(n) for n in RPP_LENGTHS])
    assert got == pytest.approx([(c - mu) / math.sqrt(var + 1e-8) for c in centred])
    assert got == pytest.approx(_whitened_by_hand(centred, RPP_LENGTHS, [True] * 6))
    assert got[2] == got[3] == pytest.approx(-mu / math.sqrt(var))  # the flat group gets -mu / std, not 0
    # filter_groups drops the flat group (1, 1) from the loss: its tokens leave the statistics too
    keep = [not f for f in flat]
    got = batch_whiten(centred, [float(n) * k for n, k in zip(RPP_LENGTHS, keep)])
    assert got == pytest.approx(_whitened_by_hand(centred, RPP_LENGTHS, keep))


def test_reinforce_pp_statistics_span_all_processes():
    """Two processes holding halves of the batch whiten exactly as one process with all of it."""
    centred, _ = group_advantages(RPP_REWARDS, 2, scale=False, estimator="reinforce_pp")
    weights = [float(n) for n in RPP_LENGTHS]
    whole = batch_whiten(centred, weights)
    halves = [(centred[:2], weights[:2]), (centred[2:], weights[2:])]
    sums = [[sum(w), sum(w_ * v for w_, v in zip(w, c)), sum(w_ * v * v for w_, v in zip(w, c))] for c, w in halves]

    def reduce(values):  # what Dist.all_reduce_sum returns on either process
        return [a + b for a, b in zip(*sums)]

    got = batch_whiten(halves[0][0], halves[0][1], reduce) + batch_whiten(halves[1][0], halves[1][1], reduce)
    assert got == pytest.approx(whole)


def test_batch_whiten_without_signal_gives_zeros():
    assert batch_whiten([0.0, 0.0, 0.0], [3.0, 2.0, 1.0]) == [0.0, 0.0, 0.0]  # every group flat
    assert batch_whiten([0.4, -0.4], [0.0, 0.0]) == pytest.approx([0.4e4, -0.4e4])  # nothing kept: no loss anyway


@pytest.mark.parametrize(("penalty", "want"), [
    (1.0, [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0]),
    (0.5, [0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5]),
])
def test_overlong_penalty_by_hand(penalty, want):
    """Lmax 10, buffer 4: free up to 6 tokens (the boundary itself is free), then -1/4 per token to -penalty at 10."""
    assert overlong_penalties([1, 5, 6, 7, 8, 9, 10], 10, 4, penalty) == pytest.approx(want)


def test_overlong_penalty_edges():
    assert overlong_penalties([3, 10, 12], 10, 0, 1.0) == [0.0, 0.0, 0.0]  # off
    assert overlong_penalties([9, 10, 12], 10, 1, 2.0) == pytest.approx([0.0, -2.0, -2.0])  # no lower than -penalty


# --- GSPO and CISPO --------------------------------------------------------------------------
# Sequence ratios of the LOG_RATIO toy (old = 0): geometric means of the token ratios on the mask,
# the padding junk left out: (1 * 1.5 * 0.5)^(1/3), (0.5 * 1.5)^(1/2), 1.1, 1.
GSPO_S = [0.75 ** (1 / 3), 0.75 ** 0.5, 1.1, 1.0]  # 0.9086, 0.8660, 1.1, 1
GSPO_ADV = [0.7, -0.7, 0.7, -0.7]


def test_gspo_value_and_gradient_by_hand():
    """Clip range [0.9, 1.05]: s0 = 0.909 inside (A > 0); s1 = 0.866 < 0.9 with A < 0, clipped; s2 = 1.1 > 1.05
    with A > 0, clipped; s3 = 1 inside (A < 0). Each completion's tokens all hold -min(s A, clip(s) A)."""
    logps = LOG_RATIO.clone().requires_grad_(True)
    terms = token_losses(logps, torch.zeros(4, 3), torch.tensor(GSPO_ADV), MASK, epsilon_low=0.1, epsilon_high=0.05,
                         loss_type="gspo")
    per_seq = [-GSPO_S[0] * 0.7, 0.9 * 0.7, -1.05 * 0.7, 1.0 * 0.7]
    want = torch.tensor([[per_seq[r]] * 3 for r in range(4)]) * MASK
    assert torch.allclose(terms["loss"], want, atol=1e-6)
    assert terms["clipped"].tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]]
    loss = aggregate(terms["loss"], MASK, "gspo", num_sequences=4, num_tokens=9, max_completion_len=3)
    assert float(loss.detach()) == pytest.approx(sum(per_seq) / 4, abs=1e-6)  # per-completion means, then mean
    loss.backward()
    # unclipped completions: d/d logp_t of -s A / 4 = -A s (1 / |y|) / 4 on each of their tokens; clipped: 0
    g0, g3 = -0.7 * GSPO_S[0] / 3 / 4, 0.7 * 1.0 / 3 / 4
    assert torch.allclose(logps.grad, torch.tensor([[g0] * 3, [0.0] * 3, [0.0] * 3, [g3] * 3]), atol=1e-6)


def test_gspo_token_form_matches_the_sequence_objective():
    """The per-token form has the value and gradient of GSPO written per sequence:
    mean_i -min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean_t log-ratio) and the gradient through s_i."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -4.0], [-0.2, -2.5, -1.1], [-0.7, -0.3, -0.9]])
    logps = (old + torch.tensor([[0.03, 0.02, 0.03], [-0.04, 0.01, 3.0], [0.05, 0.0, 0.0], [0.0, -0.02, 0.01]]))
    adv = torch.tensor([1.2, -0.8, -0.5, 0.9])
    token = logps.clone().requires_grad_(True)
    terms = token_losses(token, old, adv, MASK, epsilon_low=0.01, epsilon_high=0.015, loss_type="gspo")
    aggregate(terms["loss"], MASK, "gspo", num_sequences=4, num_tokens=9, max_completion_len=3).backward()

    seq = logps.clone().requires_grad_(True)
    s = torch.exp(((seq - old) * MASK).sum(-1) / MASK.sum(-1))
    want = (-torch.min(s * adv, torch.clamp(s, 0.99, 1.015) * adv)).mean()
    want.backward()
    got = aggregate(terms["loss"].detach(), MASK, "gspo", num_sequences=4, num_tokens=9, max_completion_len=3)
    assert float(got) == pytest.approx(float(want.detach()), abs=1e-6)
    assert torch.allclose(token.grad, seq.grad, atol=1e-6)
    # s = 1.027 (A > 0, above 1.015), 0.985 (A < 0, below 0.99): clipped; 1.051 with A < 0 and 0.997: not
    assert terms["clipped"][:, 0].tolist() == [1, 1, 0, 0]
    assert token.grad[:2].abs().sum() == 0 and token.grad[2:].abs().sum() > 0


def test_gspo_on_policy_is_the_sequence_mean_policy_gradient():
    """logp_old = logp (one optimiser step per rollout): s = 1, and the gradient is -A / (|y| * completions)."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    terms = token_losses(logps, logps.detach(), torch.tensor([2.0, -1.0]), mask, epsilon_low=3e-4,
                         epsilon_high=4e-4, loss_type="gspo")
    aggregate(terms["loss"], mask, "gspo", num_sequences=2, num_tokens=3, max_completion_len=2).backward()
    assert torch.allclose(logps.grad, torch.tensor([[-2 / 2 / 2, -2 / 2 / 2], [1 / 1 / 2, 0.0]]))
    assert not terms["clipped"].any()


# CISPO toy: log-probabilities of the sampled tokens; the padding slots hold junk
CISPO_LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, 50.0], [-0.2, 9.0, 9.0], [-0.1, -0.4, -0.3]])


def test_cispo_value_and_gradient_by_hand():
    """ratio = exp(LOG_RATIO); weights clip(ratio, 0.8, 1.28), both sides whatever the sign of A:
    row 0: 1, 1.28, 0.8; row 1: 0.8, 1.28; row 2: 1.1; row 3: 1, 1, 1. Loss per token -w A logp, token mean
    over the 9 tokens; every token keeps a gradient -w A / 9, the clipped ones too."""
    logps = CISPO_LOGPS.clone().requires_grad_(True)
    old = CISPO_LOGPS - LOG_RATIO  # so that logp - logp_old = LOG_RATIO
    terms = token_losses(logps, old, torch.tensor(GSPO_ADV), MASK, epsilon_low=0.2, epsilon_high=0.28,
                         loss_type="cispo")
    want = [[-1.0 * 0.7 * -1.0, -1.28 * 0.7 * -2.0, -0.8 * 0.7 * -0.5],   # 0.7, 1.792, 0.28
            [-0.8 * -0.7 * -3.0, -1.28 * -0.7 * -1.5, 0.0],             # -1.68, -1.344, padding
            [-1.1 * 0.7 * -0.2, 0.0, 0.0],                              # 0.154
            [-0.7 * 0.1, -0.7 * 0.4, -0.7 * 0.3]]                       # A = -0.7, w = 1: -0.07, -0.28, -0.21
    assert torch.allclose(terms["loss"], torch.tensor(want), atol=1e-6)
    assert terms["clipped"].tolist() == [[0, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]]
    loss = aggregate(terms["loss"], MASK, "cispo", num_sequences=4, num_tokens=9, max_completion_len=3)
    assert float(loss.detach()) == pytest.approx((2.772 - 3.024 + 0.154 - 0.56) / 9, abs=1e-6)
    loss.backward()
    grad = [[-0.7 * 1.0 / 9, -0.7 * 1.28 / 9, -0.7 * 0.8 / 9],
            [0.7 * 0.8 / 9, 0.7 * 1.28 / 9, 0.0],
            [-0.7 * 1.1 / 9, 0.0, 0.0],
            [0.7 / 9] * 3]
    assert torch.allclose(logps.grad, torch.tensor(grad), atol=1e-6)


def test_cispo_large_epsilon_low_leaves_no_lower_bound():
    """verl's example sets epsilon_low 10 (MiniMax-M1 sets no lower bound): a ratio of 0.5 keeps its weight."""
    logps = CISPO_LOGPS.clone().requires_grad_(True)
    terms = token_losses(logps, CISPO_LOGPS - LOG_RATIO, torch.tensor(GSPO_ADV), MASK, epsilon_low=10.0,
                         epsilon_high=0.2, loss_type="cispo")
    terms["loss"].sum().backward()
    assert float(logps.grad[0, 2]) == pytest.approx(-0.7 * 0.5)  # weight 0.5, not 0.8
    assert float(logps.grad[0, 1]) == pytest.approx(-0.7 * 1.2)  # 1.5 capped at 1.2
    assert terms["clipped"][0].tolist() == [0, 1, 0]


def test_mismatch_weights_multiply_gspo_and_cispo_terms():
    w = torch.tensor([[0.5, 2.0, 1.5], [0.25, 1.0, 1.0], [1.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    for loss_type, old in (("gspo", torch.zeros(4, 3)), ("cispo", CISPO_LOGPS - LOG_RATIO)):
        logps = LOG_RATIO if loss_type == "gspo" else CISPO_LOGPS
        kwargs = dict(epsilon_low=0.1, epsilon_high=0.05, loss_type=loss_type)
        plain = token_losses(logps, old, torch.tensor(GSPO_ADV), MASK, **kwargs)
        weighted = token_losses(logps, old, torch.tensor(GSPO_ADV), MASK, **kwargs, is_weights=w)
        assert torch.allclose(weighted["loss"], plain["loss"] * w, atol=1e-6)

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


def test_prompt_plan_positions_continue_the_stream():
    """A step that draws extra batches (dynamic sampling) reads on in the same stream of passes."""
    plan = PromptPlan(10, 4, seed=3)
    stream = [i for s in range(5) for i in plan.indices(s)]
    assert plan.at(0, 20) == stream
    assert plan.at(6, 8) == stream[6:14]  # crosses into the second pass
    assert plan.at(4 * 2, 4) == plan.indices(2)


def test_pick_groups_keeps_the_first_groups_that_vary():
    # draw order over two batches of 3: flat, varied, flat | varied, varied, flat
    flat = [True, False, True, False, False, True]
    assert pick_groups(flat, 3) == ([1, 3, 4], 3)
    assert pick_groups(flat, 2) == ([1, 3], 2)  # the third varied group is left unused, as verl cuts its batch
    # too few vary (max_gen_batches reached): the first flat ones fill the step's places, after the varied ones
    assert pick_groups([True, True, False, True], 3) == ([2, 0, 1], 1)
    assert pick_groups([True, True], 2) == ([0, 1], 0)
    with pytest.raises(ValueError):
        pick_groups([False], 2)


def test_rewards_equal_includes_every_component():
    assert rewards_equal([1.0, 1.0]) and rewards_equal([-0.5])
    assert not rewards_equal([1.0, 1.0 - 0.25])  # the same correctness, a different overlong penalty
    _, flat = group_advantages([1.0, 0.75, 0.0, 0.0], 2, scale=True)
    assert flat == [False, False, True, True]


def test_rollout_seeds_depend_on_step_and_batch_only():
    assert rollout_seed(42, 3, 0) == 45  # the first batch keeps the seeding without dynamic sampling
    seeds = {rollout_seed(42, s, b) for s in range(50) for b in range(4)}
    assert len(seeds) == 200  # no two (step, batch) share a seed
    assert rollout_seed(42, 7, 2) == rollout_seed(42, 7, 2) != rollout_seed(43, 7, 2)
    assert all(0 <= seed < 2 ** 63 for seed in seeds)


def test_dynamic_sampling_config():
    from pydantic import ValidationError

    base = {"model": {"path": "tiny:qwen2-tiny"}}
    cfg = GRPOConfig(**base)
    assert not cfg.grpo.dynamic_sampling and cfg.grpo.filter_groups is None and not cfg.filters_groups
    assert cfg.grpo.max_gen_batches == 4
    assert GRPOConfig(**base, grpo={"dynamic_sampling": True}).filters_groups  # implied
    assert GRPOConfig(**base, grpo={"dynamic_sampling": True, "filter_groups": True}).filters_groups
    assert GRPOConfig(**base, grpo={"filter_groups": True}).filters_groups
    with pytest.raises(ValidationError, match="grpo.filter_groups=false contradicts it"):
        GRPOConfig(**base, grpo={"dynamic_sampling": True, "filter_groups": False})
    with pytest.raises(ValidationError, match="max_gen_batches"):
        GRPOConfig(**base, grpo={"dynamic_sampling": True, "max_gen_batches": 0})
    for advantage in ("grpo", "rloo", "reinforce_pp"):
        GRPOConfig(**base, grpo={"dynamic_sampling": True, "advantage": advantage, "overlong_buffer": 8})
    # the resolved recipe (every key written out, filter_groups as null) validates again in the workers
    dumped = GRPOConfig(**base, grpo={"dynamic_sampling": True}).model_dump(mode="json")
    assert GRPOConfig(**dumped).filters_groups


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


def test_objective_config_checks():
    from pydantic import ValidationError

    base = {"model": {"path": "tiny:qwen2-tiny"}}
    assert GRPOConfig(**base).grpo.advantage == "grpo" and GRPOConfig(**base).grpo.overlong_buffer == 0
    for loss_type in ("gspo", "cispo"):
        assert GRPOConfig(**base, grpo={"loss_type": loss_type}).std_scaling  # the objective leaves advantages alone
    for advantage in ("rloo", "reinforce_pp"):
        assert not GRPOConfig(**base, grpo={"advantage": advantage}).std_scaling  # auto: no group std
        assert not GRPOConfig(**base, grpo={"advantage": advantage, "scale_rewards": "none"}).std_scaling
        GRPOConfig(**base, grpo={"advantage": advantage, "filter_groups": True, "loss_type": "cispo"})
        with pytest.raises(ValidationError, match=f"grpo.scale_rewards=group .* grpo.advantage={advantage}"):
            GRPOConfig(**base, grpo={"advantage": advantage, "scale_rewards": "group"})
    with pytest.raises(ValidationError, match="advantage"):
        GRPOConfig(**base, grpo={"advantage": "ppo"})
    with pytest.raises(ValidationError, match="loss_type"):
        GRPOConfig(**base, grpo={"loss_type": "gpg"})
    assert GRPOConfig(**base, grpo={"max_completion_len": 64, "overlong_buffer": 63}).grpo.overlong_buffer == 63
    with pytest.raises(ValidationError, match=r"overlong_buffer \(64\) must be below grpo.max_completion_len \(64\)"):
        GRPOConfig(**base, grpo={"max_completion_len": 64, "overlong_buffer": 64})
    with pytest.raises(ValidationError, match="overlong_penalty"):
        GRPOConfig(**base, grpo={"overlong_buffer": 8, "overlong_penalty": -1.0})


def test_tensor_parallel_engines_must_divide_the_processes():
    from pydantic import ValidationError

    base = {"model": {"path": "tiny:qwen2-tiny"}, "grpo": {"prompts_per_step": 4}}
    GRPOConfig(**base, engine={"backend": "vllm", "tensor_parallel_size": 2}, launch={"num_processes": 4})
    GRPOConfig(**base, engine={"backend": "hf", "tensor_parallel_size": 2}, launch={"num_processes": 1})  # hf ignores it
    with pytest.raises(ValidationError, match="tensor_parallel_size=2 must divide launch.num_processes=1"):
        GRPOConfig(**base, engine={"backend": "vllm", "tensor_parallel_size": 2}, launch={"num_processes": 1})
