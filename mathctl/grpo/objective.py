"""The GRPO objective: rewards to advantages, per-token policy-gradient losses, importance weights against
the engine, and the normalisers (formulas in the package docstring)."""

from __future__ import annotations

import math
from typing import Any

ADV_EPS = 1e-4
LOG_RATIO_BOUND = 20.0  # |log pi_trainer / pi_engine| is clamped here before exp (verl's bound): exp(20) ~ 5e8




# --- the objective ----------------------------------------------------------------------------


def overlong_penalties(lengths: list[int], max_len: int, buffer: int, penalty: float) -> list[float]:
    """DAPO's soft overlong punishment per completion length (tokens): 0 up to `max_len - buffer`, then
    falling linearly to -`penalty` at `max_len` (and no lower past it). `buffer` 0: all zeros."""
    if buffer <= 0:
        return [0.0] * len(lengths)
    start = max_len - buffer
    return [-min(max(length - start, 0), buffer) / buffer * penalty for length in lengths]


def rewards_equal(group: list[float]) -> bool:
    """A group whose rewards are all equal: no advantage signal (filter_groups drops it, dynamic sampling
    replaces it). Exact equality, as verl's `std > 0` test: rewards are sums of a few floats."""
    return max(group) - min(group) == 0


def group_advantages(rewards: list[float], group_size: int, scale: bool,
                     estimator: str = "grpo") -> tuple[list[float], list[bool]]:
    """Per-completion advantages (consecutive runs of `group_size` form a group) and, per completion,
    whether its group's rewards were all equal. `estimator`: grpo (r - mean, divided by the group's
    std when `scale`), rloo (r - mean of the others), reinforce_pp (r - mean; `batch_whiten` follows)."""
    if estimator not in ("grpo", "rloo", "reinforce_pp"):
        raise ValueError(f"unknown advantage estimator {estimator}")
    out, flat = [], []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        n = len(group)
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1)) if n > 1 else 0.0
        same = rewards_equal(group)
        for r in group:
            if estimator == "rloo":  # r - (sum - r) / (n - 1), written through the mean
                out.append(n / (n - 1) * (r - mean) if n > 1 else 0.0)
            elif estimator == "grpo" and scale:
                out.append((r - mean) / (std + ADV_EPS))
            else:
                out.append(r - mean)
            flat.append(same)
    return out, flat


def batch_whiten(values: list[float], weights: list[float], reduce=None) -> list[float]:
    """(v - mu) / sqrt(var + 1e-8) with mu and the unbiased var weighted by `weights` (REINFORCE++: the
    completion token counts, 0 for completions that carry no loss). `reduce` sums a list of floats over
    processes (Dist.all_reduce_sum), so every process whitens with the whole step's statistics. Fewer than
    two weighted tokens in all: var 0."""
    total, first, second = sum(weights), sum(w * v for w, v in zip(weights, values)), \
        sum(w * v * v for w, v in zip(weights, values))
    if reduce is not None:
        total, first, second = reduce([total, first, second])
    mean = first / total if total > 0 else 0.0
    var = max(second - total * mean * mean, 0.0) / (total - 1) if total > 1 else 0.0  # float64 sums: rewards are O(1)
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [(v - mean) * scale for v in values]


def token_losses(logps, old_logps, advantages, mask, *, epsilon_low: float, epsilon_high: float, beta: float = 0.0,
                 ref_logps=None, is_weights=None, loss_type: str = "dapo") -> dict[str, Any]:
    """Per-token loss terms. Tensors are (batch, tokens) [B, T]; `advantages` is (batch,). `loss_type`
    picks the policy-gradient term (gspo and cispo their own, the others PPO's clipped surrogate; see the
    module docstring). `is_weights` (constants, from `importance_weights`) multiply the policy-gradient
    term, not the KL term. Returns the per-token loss and the clip/KL statistics (masked tokens are
    zeroed). `clipped` marks tokens whose gradient the clipping changed: per token for the PPO
    surrogate, every token of a clipped completion for gspo, every token whose weight was clipped for cispo."""
    import torch

    mask = mask.to(logps.dtype)
    on = mask > 0  # padding and masked completions: log-ratio 0, so no inf/nan can leak through `* mask`
    zero = torch.zeros_like(logps)
    log_ratio = torch.where(on, logps - old_logps, zero)
    adv = advantages[:, None].to(logps.dtype)
    low_bound, high_bound = 1 - epsilon_low, 1 + epsilon_high
    if loss_type == "cispo":
        # bounds as verl's compute_policy_loss_cispo, [1 - epsilon_low, 1 + epsilon_high] (TRL's cispo instead
        # caps the raw ratio at epsilon_high, with no lower bound)
        ratio = torch.exp(log_ratio)
        weight = torch.clamp(ratio, low_bound, high_bound).detach()  # a constant: no gradient through the ratio
        per_token = -weight * adv * torch.where(on, logps, zero)
        hit = (ratio < low_bound) | (ratio > high_bound)
    else:
        if loss_type == "gspo":
            # s = exp(mean of the completion's log-ratios) [B, 1]; per token sg[s] * pi_t / sg[pi_t], the same
            # value as s with gradient s * grad logp_t (0 off the mask: the where keeps padding out)
            lengths = mask.sum(-1, keepdim=True).clamp(min=1)
            seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / lengths
            ratio = torch.exp(torch.where(on, logps - logps.detach(), zero) + seq_log_ratio.detach())
        else:
            ratio = torch.exp(log_ratio)
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, low_bound, high_bound) * adv)
        # clipping is active where the clipped branch is the smaller one and differs (its gradient is 0)
        hit = ((ratio < low_bound) & (adv < 0)) | ((ratio > high_bound) & (adv > 0))
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probabilities")
        delta = torch.where(on, ref_logps - logps, torch.zeros_like(logps))
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    return {"loss": per_token * mask, "kl": None if kl is None else kl * mask, "clipped": hit.to(logps.dtype) * mask,
            "mask": mask}


def resolve_is_correction(mode: str, backend: str) -> str:
    """`grpo.is_correction` for a resolved engine backend: auto is tis for vllm, none for hf."""
    if mode != "auto":
        return mode
    return "tis" if backend == "vllm" else "none"


def importance_weights(old_logps, engine_logps, mask, *, mode: str, level: str, cap: float, floor: float = 0.0):
    """Weights that correct for sampling from the engine rather than from the trainer's policy.

    ratio = exp(old_logps - engine_logps): logp_old is the trainer's log-probability of the sampled
    token under the weights that generated the batch (before this step's updates), engine_logps the
    engine's. With `level="sequence"` a completion's ratio is the product over its tokens (the sum of
    the log-ratios), and every token of it gets that value. tis: w = min(ratio, cap). mis: w = ratio
    inside [floor, cap], 0 outside (the token or completion is dropped from the policy gradient; it
    still counts in the loss normaliser).

    Tensors are (batch, tokens) [B, T]; positions where `mask` is 0 get weight 1 (no correction).
    Returns (weights, hit): the weights (no gradient) and where the cap truncated (tis) or the bounds
    dropped (mis) the ratio.
    """
    import torch

    on = mask > 0
    log_ratio = torch.where(on, old_logps.detach() - engine_logps, torch.zeros_like(old_logps))
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(old_logps)
    elif level != "token":
        raise ValueError(f"unknown importance-sampling level {level}")
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # finite in fp32, far past any cap
    if mode == "tis":
        hit = ratio > cap
        weights = ratio.clamp(max=cap)
    elif mode == "mis":
        hit = (ratio > cap) | (ratio < floor)
        weights = torch.where(hit, torch.zeros_like(ratio), ratio)
    else:
        raise ValueError(f"unknown importance-sampling mode {mode}")
    return torch.where(on, weights, torch.ones_like(weights)).detach(), hit & on


def aggregate(per_token, mask, loss_type: str, *, num_sequences: float, num_tokens: float, max_completion_len: int):
    """The step's loss contribution of this micro-batch. `num_sequences` / `num_tokens` are the whole
    optimiser step's counts (all micro-batches, all processes). gspo aggregates like grpo (per-completion
    means: GSPO's objective is a mean over sequences), cispo like dapo (MiniMax-M1's token-level mean)."""
    loss_type = {"gspo": "grpo", "cispo": "dapo"}.get(loss_type, loss_type)
    if loss_type == "grpo":
        lengths = mask.sum(-1).clamp(min=1)
        return (per_token.sum(-1) / lengths).sum() / max(num_sequences, 1)
    if loss_type == "dapo":
        return per_token.sum() / max(num_tokens, 1)
    if loss_type == "dr_grpo":
        return per_token.sum() / max(num_sequences * max_completion_len, 1)
    raise ValueError(f"unknown loss_type {loss_type}")


class MismatchMeter:
    """One step's engine/trainer log-probability gap and importance-weight statistics, summed over
    micro-batches (this process's share; `run` reduces them over processes)."""

    def __init__(self) -> None:
        self.gap_sum = self.gap_tokens = self.gap_max = 0.0
        self.weight_sum = self.weight_count = self.hits = 0.0
        self.weight_min, self.weight_max = math.inf, -math.inf

    def add(self, old_logps, engine_logps, have, active, weights=None, hit=None, *, sequence: bool = False) -> None:
        """Tensors [B, T]. The gap counts every position the engine reported (`have`); the weights count
        the positions that carry loss (`active`): per token, or per completion at sequence level."""
        gap = (engine_logps - old_logps).abs() * have
        if have.sum() > 0:
            self.gap_sum += float(gap.sum())
            self.gap_tokens += float(have.sum())
            self.gap_max = max(self.gap_max, float(gap.max()))
        if weights is None:
            return
        on = (active > 0) & (have > 0)
        if sequence:  # every token of a completion holds its one weight: count it once
            rows = on.any(-1)
            w, h = weights[:, 0][rows], hit[:, 0][rows]
        else:
            w, h = weights[on], hit[on]
        if w.numel():
            self.weight_sum += float(w.sum())
            self.weight_count += w.numel()
            self.hits += float(h.sum())
            self.weight_min = min(self.weight_min, float(w.min()))
            self.weight_max = max(self.weight_max, float(w.max()))
