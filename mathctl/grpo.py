"""GRPO with verifiable math rewards: `mathctl grpo --recipe NAME [key=value ...]`.

One step of a run:
1. take `grpo.prompts_per_step` prompts (a seeded order over the data, epoch after epoch; each
   process takes every world-th one) and generate `grpo.group_size` completions per prompt with the
   inference engine (transformers here; vLLM on GPU), seeded by (train.seed + step, prompt index), so
   a resumed run draws exactly the samples an uninterrupted one would;
2. score them with the recipe's reward functions (`rewards.weights`, mathctl.rewards: the eval grader,
   time-limited in worker processes); with `grpo.overlong_buffer: N > 0`, DAPO's soft overlong
   punishment is added to each total, from the completion's length L in tokens (EOS included) and
   Lmax = `grpo.max_completion_len`:
       0                                           L <= Lmax - N
       ((Lmax - N) - L) / N * overlong_penalty     Lmax - N < L <= Lmax   (falls linearly to -overlong_penalty)
   With `grpo.dynamic_sampling` (DAPO's, Yu et al. 2025; verl's filter_groups), steps 1-2 repeat on the
   next `prompts_per_step` prompts of the order, the data position moving on by every prompt drawn, until
   `prompts_per_step` of the step's groups have rewards (overlong penalty included) that are not all equal,
   or `grpo.max_gen_batches` batches were generated. The step trains on the first `prompts_per_step` such
   groups in draw order; groups with equal rewards are dropped and later varied ones left unused. Every
   process draws its share of each batch and the flags of all groups are summed over processes, so all
   take the same decision and the kept groups (moved between processes where needed, place j to process
   j % world) do not depend on the number of processes. Batch b of step s is sampled with seed
   rollout_seed(train.seed, s, b) (train.seed + s for b = 0), and the data position is saved with every
   checkpoint: a resumed run draws the same prompts and samples. Where verl stops the run once
   max_num_gen_batches is reached, here the step goes on with the groups found (a warning; the places left
   hold groups with equal rewards, which carry no loss);
3. advantages, by `grpo.advantage`:
       grpo          A = r - mean(group), divided by the group's std (unbiased, + 1e-4) when
                     `grpo.scale_rewards: group` (the default; `none` for Dr. GRPO)
       rloo          A = r - mean of the other G - 1 rewards of the group = G / (G - 1) * (r - mean(group)),
                     no std (RLOO, Ahmadian et al. 2024)
       reinforce_pp  c = r - mean(group), then whitened over the step's batch: A = (c - mu) / sqrt(var + 1e-8),
                     mu and var (unbiased) over every completion token that carries loss, all processes
                     together: a completion counts once per token (REINFORCE++-baseline, Hu 2025; verl's
                     compute_reinforce_plus_plus_baseline_outcome_advantage whitens the same way over its
                     response mask). Completions dropped by filter_groups or mask_truncated are left out of mu and
                     var, as if they were not in the batch
   rloo and reinforce_pp take no group std (`scale_rewards: group` with them is refused);
4. `grpo.epochs` passes over the rollout batch, each split into `grpo.mini_batches` optimiser steps,
   minimising per completion token t (logp_old: the policy that generated the batch; with one
   optimiser step per rollout logp_old = logp and every ratio is 1, so clipping never acts):
       ratio_t  = exp(logp_t - logp_old_t)
       pg_t     = -min(ratio_t * A, clip(ratio_t, 1 - epsilon_low, 1 + epsilon_high) * A)   (grpo, dapo, dr_grpo)
       kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3, only when beta > 0)
       loss_t   = w_t * pg_t + beta * kl_t                       (w_t: mismatch correction, below; else 1)
   Two other policy-gradient terms replace pg_t:
       gspo     GSPO (Zheng et al. 2025): one ratio per completion, the geometric mean of its token ratios,
                s = exp(mean_t (logp_t - logp_old_t)), clipped per completion. Written per token as the
                paper's GSPO-token and verl's compute_policy_loss_gspo do, s_t = sg[s] * exp(logp_t - sg[logp_t])
                (sg: no gradient; s_t equals s in value), and pg_t = -min(s_t * A, clip(s_t, 1 - epsilon_low,
                1 + epsilon_high) * A); averaged per completion, its gradient is s * A * mean_t grad logp_t, or 0
                when s is clipped: the same value and gradient as the sequence form (TRL's
                importance_sampling_level="sequence" computes that form directly)
       cispo    CISPO (MiniMax-M1, 2025): pg_t = -sg[clip(ratio_t, 1 - epsilon_low, 1 + epsilon_high)] * A * logp_t,
                the clipped ratio a constant weight: every token keeps its gradient (none is dropped by
                clipping). The two-sided bounds are verl's (compute_policy_loss_cispo; TRL caps the raw ratio
                at epsilon_high instead); a large epsilon_low (verl's example: 10) leaves no lower bound,
                as the paper does
   aggregated by `grpo.loss_type`:
       grpo     mean over each completion's tokens, then mean over completions (also gspo: the paper's
                sequence mean)
       dapo     sum over all completion tokens / number of completion tokens (token-level; also cispo)
       dr_grpo  sum over all completion tokens / (completions * max_completion_len) (no length bias;
                with `scale_rewards: none` by default)
   The normaliser is the whole optimiser step's (every micro-batch, every process), so gradient
   accumulation and data parallelism do not change the loss;
5. push the new weights into the engine (LoRA: merged), ready for the next step's rollouts.

Masks: only completion tokens (the EOS included) carry loss; prompt and padding never do.
`grpo.mask_truncated` drops completions cut by `max_completion_len`; `grpo.filter_groups` (on by default
with dynamic sampling) drops groups whose rewards are all equal (under grpo and rloo advantages they carry
none, only dilution of the normaliser; under reinforce_pp the batch whitening gives them -mu / std).

log-probabilities are taken from `logits / temperature`, the distribution the engine sampled from;
with `top_p < 1` or `top_k` the engine samples from a truncated distribution and the ratio is against
the full one (as TRL and verl do).

Engine/trainer mismatch. The engine samples from its own copy of the weights with its own kernels
(vLLM in bf16), so the tokens come from pi_engine, not quite from pi_old, the trainer's policy at
rollout time. logp_old is computed by the trainer before any update of the step (the first forward's
log-probs when there is one optimiser step per rollout, else one extra pass), and every sampled token
carries the engine's log-prob too. `grpo.is_correction` weighs the surrogate by the importance ratio
rho = pi_old / pi_engine = exp(logp_old - logp_engine), a constant (no gradient) that leaves the KL
term alone (TRL, verl, open-instruct do the same):
       tis   w_t = min(rho_t, is_cap)                              truncated importance sampling
       mis   w_t = rho_t if is_floor <= rho_t <= is_cap, else 0    masked: the token is dropped
With `grpo.is_level: sequence` rho is one value per completion, the product of its tokens' ratios
(exp of the summed log-ratio), and tis/mis truncate or drop whole completions. Dropped tokens still
count in the loss normaliser. `auto` is tis for vLLM and none for the hf engine, which samples with
the trainer's own kernels and weights (its gap is ~1e-6 on CPU).
Each step logs `logprob_diff` (the mean |logp_engine - logp_old| of the sampled tokens) and
`logprob_diff_max`, and the weights' `is_weight_mean/min/max` with `is_clipped_frac` (tis) or
`is_masked_frac` (mis). A mean gap above `grpo.max_logprob_diff` stops the run with exit 2 before
the step's first optimiser update: the engine is then sampling from another model (a wrong weight
push), which no reweighting fixes.

With `beta: 0` no reference model is built. With LoRA the reference is the base model with the
adapters switched off: no second copy.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from mathctl.core.config import (
    EngineConfig,
    LaunchConfig,
    LMTrainBase,
    LoraSpec,
    ModelSpec,
    OutputConfig,
    Strict,
    TrackingConfig,
    check_lora_launch,
)
from mathctl.core.console import console, log, progress, warn
from mathctl.core.errors import DataError, EngineError
from mathctl.core.rundir import RunDir
from mathctl.rewards import RewardsConfig, no_answer_count
from mathctl.rows import SyntheticData

ADV_EPS = 1e-4
LOG_RATIO_BOUND = 20.0  # |log pi_trainer / pi_engine| is clamped here before exp (verl's bound): exp(20) ~ 5e8


# --- config -----------------------------------------------------------------------------------


class GRPOData(Strict):
    source: str | list[str] = Field(
        "synthetic", description="`synthetic`; a folder from `mathctl data prepare --kind rl`; a .jsonl/.json/.parquet "
        "file with prompt (or problem/question) and answer; a hub id; or a list of these (mixed).")
    subset: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Split of a hub dataset or data folder.")
    prompt_field: str | None = Field(None, description="Field with the user turn; auto: prompt (used as it is), "
                                     "else problem/question/query (put into prompt_template).")
    answer_field: str | None = Field(None, description="Field with the gold answer; auto: answer, expected_answer, "
                                     "final_answer, or the last \\boxed{} of solution.")
    prompt_template: str = Field("{prompt}\nLet's think step by step and output the final answer within \\boxed{}.",
                                 description="User turn built from a problem field; `{prompt}` is replaced.")
    system_prompt: str | None = Field(None, description="Optional system message put first.")
    max_rows: int | None = Field(None, ge=1, description="Use only the first N rows.")
    shuffle_seed: int = Field(42, description="Seed of the prompt order (reshuffled every pass).")
    synthetic: SyntheticData = Field(default_factory=SyntheticData)


class GRPOSpec(Strict):
    group_size: int = Field(8, ge=2, description="Completions per prompt (G).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per rollout step, over all processes.")
    epochs: int = Field(1, ge=1, description="Optimisation passes over each rollout batch (TRL num_iterations, verl ppo_epochs).")
    mini_batches: int = Field(1, ge=1, description="Optimiser steps per pass (the rollout batch split evenly).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "gspo", "cispo"] = Field(
        "dapo", description="grpo: per-completion token mean, then mean; dapo: token-level mean over the step; "
        "dr_grpo: token sum / (completions * max_completion_len); gspo: GSPO's sequence-level ratio (the geometric "
        "mean of the completion's token ratios) clipped per completion, aggregated like grpo; cispo: CISPO, the "
        "clipped ratio as a no-gradient weight on A * logp of every token, aggregated like dapo. The clip ranges "
        "only act when logp_old differs from logp: grpo.epochs > 1 or grpo.mini_batches > 1.")
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = Field(
        "grpo", description="grpo: reward minus the group mean (divided by the group std per scale_rewards); rloo: "
        "reward minus the mean of the other G - 1 rewards of the group, no std; reinforce_pp: REINFORCE++-baseline, "
        "reward minus the group mean, then whitened by the mean and std over the step's completion tokens that carry "
        "loss (all processes). rloo and reinforce_pp refuse scale_rewards=group.")
    scale_rewards: Literal["group", "none", "auto"] = Field(
        "auto", description="Divide advantages by the group's reward std (group) or not (none); auto: group for "
        "advantage=grpo, except none for dr_grpo; none for rloo and reinforce_pp.")
    epsilon_low: float = Field(0.2, ge=0, description="Lower clip: ratio >= 1 - epsilon_low (gspo: of the sequence "
                               "ratio; cispo: of the weight, where >= 1 means no lower bound). GSPO's paper uses 3e-4.")
    epsilon_high: float | None = Field(None, ge=0, description="Upper clip (clip-higher, DAPO 0.28); default "
                                       "epsilon_low. GSPO's paper uses 4e-4 (sequence ratios stay near 1).")
    beta: float = Field(0.0, ge=0, description="KL coefficient (k3 estimator); 0 builds no reference model.")
    max_prompt_len: int = Field(512, ge=1, description="Prompts longer than this (tokens) are dropped at load, counted.")
    max_completion_len: int = Field(1024, ge=1, description="Tokens generated at most per completion.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature (also divides the trainer's logits).")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus sampling.")
    top_k: int | None = Field(None, ge=1, description="Rollout top-k.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings for rollouts.")
    mask_truncated: bool = Field(False, description="No loss on completions cut by max_completion_len.")
    filter_groups: bool | None = Field(
        None, description="No loss on groups whose rewards are all equal (the overlong penalty included). Default "
        "(null): on with dynamic_sampling, else off; false with dynamic_sampling is refused.")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: groups whose rewards are all equal are dropped and replaced from "
        "further generation batches of prompts_per_step new prompts (the data position moves on by every prompt "
        "drawn), until the step holds prompts_per_step groups whose rewards differ or max_gen_batches batches were "
        "generated; then it trains on the groups found (logged: gen_batches, groups_kept, groups_dropped).")
    max_gen_batches: int = Field(
        4, ge=1, description="dynamic_sampling: generation batches per step at most (verl's "
        "filter_groups.max_num_gen_batches, which stops the run when reached; here the step goes on with fewer "
        "groups and a warning).")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO's soft overlong punishment, in tokens: a completion longer than "
        "max_completion_len - overlong_buffer gets a penalty growing linearly to -overlong_penalty at "
        "max_completion_len, added to its reward (logged as overlong_penalty). 0: off.")
    overlong_penalty: float = Field(1.0, ge=0, description="The penalty at max_completion_len when overlong_buffer > 0.")
    is_correction: Literal["auto", "none", "tis", "mis"] = Field(
        "auto", description="Engine/trainer mismatch correction of the policy-gradient term, with the weight "
        "w = pi_trainer_old / pi_engine of the sampled tokens: tis truncates it at is_cap; mis zeroes it outside "
        "[is_floor, is_cap]; none uses no weight; auto: tis when the engine is vllm, none for hf (it samples with "
        "the trainer's own kernels).")
    is_level: Literal["token", "sequence"] = Field(
        "token", description="One weight per token, or one per completion: the product of its tokens' ratios "
        "(exp of the summed log-ratio, as TRL and verl do).")
    is_cap: float = Field(2.0, gt=1, description="Upper bound of the importance weight (tis: truncated to it; "
                          "mis: zero above it).")
    is_floor: float | None = Field(None, ge=0, description="mis only: weights below it are zeroed; default 1 / "
                                   "is_cap; 0 masks nothing from below.")
    max_logprob_diff: float | None = Field(
        0.5, gt=0, description="Stop the run (exit 2) when the mean |engine - trainer| log-probability gap of a "
        "step's sampled tokens exceeds this (nats): the engine is not sampling from the model being trained. "
        "Measured on CPU in fp32: ~1e-6 (hf and vLLM); bf16 on a GPU is expected near 1e-2; top_p adds at most "
        "log(1 / top_p). null: no check.")


class GRPOTrain(LMTrainBase):
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    micro_batch_size: int = Field(4, ge=1, description="Completions per forward pass.")
    max_steps: int | None = Field(None, ge=1, description="Rollout steps (default: epochs over the prompts).")
    seed: int = Field(42, description="Sampling and initialisation seed.")


class GRPOConfig(Strict):
    """`mathctl grpo` recipe."""

    step: Literal["grpo"] = "grpo"
    model: ModelSpec
    data: GRPOData = Field(default_factory=GRPOData)
    grpo: GRPOSpec = Field(default_factory=GRPOSpec)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    train: GRPOTrain = Field(default_factory=GRPOTrain)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if "{prompt}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}")
        world = self.launch.num_processes
        if self.grpo.prompts_per_step % world:
            raise ValueError(f"grpo.prompts_per_step ({self.grpo.prompts_per_step}) must be a multiple of "
                             f"launch.num_processes ({world})")
        local = self.grpo.prompts_per_step // world * self.grpo.group_size
        if local % self.grpo.mini_batches:
            raise ValueError(f"each process's {local} completions per step do not split into grpo.mini_batches="
                             f"{self.grpo.mini_batches} equal parts")
        if self.grpo.advantage != "grpo" and self.grpo.scale_rewards == "group":
            what = ("RLOO's baseline is the mean of the other completions, with no std" if self.grpo.advantage == "rloo"
                    else "REINFORCE++ normalises by the std over the whole batch, not per group")
            raise ValueError(f"grpo.scale_rewards=group divides by each group's reward std, which grpo.advantage="
                             f"{self.grpo.advantage} does not do ({what}); set grpo.scale_rewards=auto (or none), or "
                             "grpo.advantage=grpo")
        if self.grpo.dynamic_sampling and self.grpo.filter_groups is False:
            raise ValueError("grpo.dynamic_sampling=true replaces the groups whose rewards are all equal, so it filters "
                             "them: grpo.filter_groups=false contradicts it; drop grpo.filter_groups (or set it true), "
                             "or set grpo.dynamic_sampling=false")
        if self.grpo.overlong_buffer >= self.grpo.max_completion_len:
            raise ValueError(f"grpo.overlong_buffer ({self.grpo.overlong_buffer}) must be below grpo.max_completion_len "
                             f"({self.grpo.max_completion_len}): the penalty starts that many tokens before the limit")
        if self.grpo.is_floor is not None:
            if self.grpo.is_correction != "mis":
                raise ValueError(f"grpo.is_floor applies to grpo.is_correction=mis only (got "
                                 f"{self.grpo.is_correction}); drop is_floor or set is_correction=mis")
            if self.grpo.is_floor >= self.grpo.is_cap:
                raise ValueError(f"grpo.is_floor ({self.grpo.is_floor}) must be below grpo.is_cap ({self.grpo.is_cap})")
        tp = self.engine.tensor_parallel_size
        if self.engine.backend != "hf" and tp > 1 and world % tp:
            raise ValueError(f"engine.tensor_parallel_size={tp} must divide launch.num_processes={world}: GRPO runs one "
                             "vLLM engine per group of that many training processes")
        check_lora_launch(self.lora, self.launch)
        return self

    def seeds(self) -> dict[str, int]:
        return {"train": self.train.seed, "data_shuffle": self.data.shuffle_seed, "synthetic": self.data.synthetic.seed}

    @property
    def std_scaling(self) -> bool:
        mode = self.grpo.scale_rewards
        return mode == "group" or (mode == "auto" and self.grpo.advantage == "grpo" and self.grpo.loss_type != "dr_grpo")

    @property
    def filters_groups(self) -> bool:
        """Whether groups whose rewards are all equal carry no loss: grpo.filter_groups, by default on with
        dynamic sampling."""
        return self.grpo.filter_groups if self.grpo.filter_groups is not None else self.grpo.dynamic_sampling

    @property
    def epsilon_high(self) -> float:
        return self.grpo.epsilon_high if self.grpo.epsilon_high is not None else self.grpo.epsilon_low

    @property
    def is_floor(self) -> float:
        return self.grpo.is_floor if self.grpo.is_floor is not None else 1 / self.grpo.is_cap


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


# --- data -------------------------------------------------------------------------------------

_PROMPT_FIELDS = ("problem", "question", "query")
_ANSWER_FIELDS = ("answer", "expected_answer", "final_answer", "gold")


def load_prompts(data: GRPOData) -> list[dict[str, Any]]:
    """Rows as {messages, answer}; a row without a usable prompt or answer exits 2 naming it."""
    from mathctl.grading.extract import extract_boxed_all
    from mathctl.rows import load_rows

    sources = [data.source] if isinstance(data.source, str) else list(data.source)
    if not sources:
        raise DataError("data.source is an empty list", hint="name at least one data source")
    rows = []  # (source, row number in it, row)
    for source in sources:
        loaded = load_rows(source, subset=data.subset, split=data.split, synthetic=data.synthetic)
        rows += [(source, i, row) for i, row in enumerate(loaded)]
    if data.max_rows:
        rows = rows[: data.max_rows]
    out = []
    for source, i, row in rows:
        if data.prompt_field:
            if data.prompt_field not in row:
                raise DataError(f"row {i + 1} of {source} has no field {data.prompt_field}", hint="fix data.prompt_field")
            content = data.prompt_template.replace("{prompt}", str(row[data.prompt_field]))
        elif "prompt" in row and isinstance(row["prompt"], str):
            content = row["prompt"]  # a `mathctl data --kind rl` row: the template is applied already
        else:
            key = next((k for k in _PROMPT_FIELDS if k in row), None)
            if key is None:
                raise DataError(f"row {i + 1} of {source} has no prompt field (has {sorted(row)})",
                                hint="set data.prompt_field, or prepare the data with `mathctl data prepare --kind rl`")
            content = data.prompt_template.replace("{prompt}", str(row[key]))
        answer_key = data.answer_field or next((k for k in _ANSWER_FIELDS if row.get(k) not in (None, "")), None)
        answer = row.get(answer_key) if answer_key else None
        if answer in (None, "") and isinstance(row.get("solution"), str):
            boxes = extract_boxed_all(row["solution"])
            answer = boxes[-1] if boxes else None
        if answer in (None, ""):
            raise DataError(f"row {i + 1} of {source} has no gold answer",
                            hint="set data.answer_field, or drop rows without answers (`mathctl data prepare --kind rl` does)")
        messages = [{"role": "user", "content": content}]
        if data.system_prompt:
            messages.insert(0, {"role": "system", "content": data.system_prompt})
        out.append({"messages": messages, "answer": answer if isinstance(answer, list) else str(answer)})
    if not out:
        raise DataError(f"{', '.join(sources)} holds no prompts", hint="check data.source")
    return out


class PromptPlan:
    """Which prompts step s uses: a seeded permutation per pass over the data, consumed in order."""

    def __init__(self, num_prompts: int, per_step: int, seed: int):
        self.n, self.per_step, self.seed = num_prompts, per_step, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """The prompts of step `step` when every step draws `per_step` of them."""
        return self.at(step * self.per_step, self.per_step)

    def at(self, position: int, count: int) -> list[int]:
        """`count` prompts from `position` on in the stream of passes (the data position: prompts drawn so far)."""
        return [self._order((position + k) // self.n)[(position + k) % self.n] for k in range(count)]


# --- dynamic sampling -------------------------------------------------------------------------


def rollout_seed(seed: int, step: int, batch: int) -> int:
    """Sampling seed of generation batch `batch` of rollout step `step` (every completion is then seeded by
    this, its prompt's index and its own index). Batch 0 keeps seed + step, the seeding without dynamic
    sampling; a refill batch gets a seed mixed from all three, so a prompt drawn again within a step (a
    small data set wraps around) is not handed the samples it already had."""
    if batch == 0:
        return seed + step
    from mathctl.engines import sample_seed

    return sample_seed(seed + step, batch, 0)


def pick_groups(flat: list[bool], needed: int) -> tuple[list[int], int]:
    """Dynamic sampling's choice among the groups drawn in a step (`flat`: in draw order, over all processes,
    whether each group's rewards are all equal): the positions of the first `needed` groups whose rewards
    differ (later ones are left unused, as verl cuts its batch), then, when fewer than `needed` differ, the
    first flat groups, which fill the step's places and carry no loss. Returns (positions, groups that differ)."""
    varied = [p for p, f in enumerate(flat) if not f][:needed]
    filler = [p for p, f in enumerate(flat) if f][:needed - len(varied)]
    if len(varied) + len(filler) < needed:
        raise ValueError(f"{len(flat)} groups drawn, {needed} needed")
    return varied + filler, len(varied)


# --- weights for the engine -------------------------------------------------------------------


def engine_weights(model, lora: LoraSpec):
    """The policy's full weights under the plain model's names, one tensor at a time (LoRA merged).

    Under FSDP2 each tensor is gathered (`full_tensor`, a collective: every process walks the same
    order) only when the consumer asks for it, so a push never holds more than one full tensor (two
    small LoRA factors beside it) in addition to the shards; the engine casts it to its own dtype."""
    from mathctl import training

    def full(tensor):
        tensor = tensor.detach()
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    state = training.unwrap(model).state_dict()  # FSDP2: DTensor shards, nothing gathered yet
    if not lora.enabled:
        for name, value in state.items():
            yield name, full(value)
        return
    scale = lora.alpha / lora.r
    prefix = "base_model.model."
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or "lora_dropout" in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        value = full(value)
        if ".base_layer." in name:
            module = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{module}.lora_A.default.weight")
            b = state.get(f"{module}.lora_B.default.weight")
            if a is not None and b is not None and name.endswith(".weight"):
                value = value + scale * (full(b).float() @ full(a).float()).to(value.dtype)
        yield name, value


# --- log-probabilities ------------------------------------------------------------------------


def build_batch(items: list[dict[str, Any]], pad_id: int, device):
    """Prompts left-padded, completions right-padded: completion token j of every row sits at column
    P + j, so the logits of the last C + 1 positions are all that is needed."""
    import torch

    p_len = max(len(it["prompt_ids"]) for it in items)
    c_len = max(len(it["completion_ids"]) for it in items)
    ids = torch.full((len(items), p_len + c_len), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros((len(items), c_len), dtype=torch.float32)
    for r, it in enumerate(items):
        p, c = it["prompt_ids"], it["completion_ids"]
        ids[r, p_len - len(p):p_len] = torch.tensor(p)
        ids[r, p_len:p_len + len(c)] = torch.tensor(c)
        attn[r, p_len - len(p):p_len + len(c)] = 1
        cmask[r, :len(c)] = 1.0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": positions.to(device),
            "completion_mask": cmask.to(device), "completion_ids": ids[:, p_len:].to(device), "c_len": c_len}


def completion_logprobs(model, batch: dict[str, Any], temperature: float, *, entropy: bool = False,
                        chunk_tokens: int | None = 1024):
    """log p(token) of every completion position under logits / temperature; optionally the entropy. With
    `chunk_tokens` the LM head works that many positions at a time (mathctl/losses.py): no [B, C, V] fp32
    logits are held; None (or a model that changes its logits after the head) takes the full-logits path."""
    from mathctl import losses

    c_len = batch["c_len"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch["position_ids"], "use_cache": False, "logits_to_keep": c_len + 1}
    if chunk_tokens and losses.chunked_head_supported(model):
        # position P-1+j predicts completion token j: the head's last position has no target
        with losses.head_logprobs(model, batch["completion_ids"], temperature=temperature, chunk_tokens=chunk_tokens,
                                  entropy=entropy, drop_last=True) as head:
            model(**inputs)
        return head.logprobs, head.entropy
    logits = model(**inputs).logits[:, :-1, :]
    return losses.plain_logprobs(logits, batch["completion_ids"], temperature=temperature, entropy=entropy)


# --- run --------------------------------------------------------------------------------------


def run(cfg: GRPOConfig, run_dir: RunDir) -> dict[str, Any]:
    import contextlib

    import torch

    from mathctl import models, training
    from mathctl.core.config import SamplingConfig
    from mathctl.core.io import atomic_write_json, atomic_write_text
    from mathctl.engines import make_engine, resolve_backend
    from mathctl.engines.hf import HFEngine

    g = cfg.grpo
    dist = training.init_distributed(cfg.launch)
    if dist.is_main:
        run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    training.set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    if dist.is_main:
        atomic_write_text(run_dir.path / "chat_template.jinja", tokenizer.chat_template)

    # --- data
    rows = load_prompts(cfg.data)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    for row, ids in zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"]):  # one batched call
        row["prompt_ids"] = ids
    kept = [r for r in rows if len(r["prompt_ids"]) <= g.max_prompt_len]
    dropped = len(rows) - len(kept)
    if not kept:
        raise DataError(f"every prompt is longer than grpo.max_prompt_len={g.max_prompt_len} tokens",
                        hint="raise grpo.max_prompt_len")
    rows = kept
    plan = PromptPlan(len(rows), g.prompts_per_step, cfg.data.shuffle_seed)
    total_steps = cfg.train.max_steps or max(1, math.ceil(len(rows) * cfg.train.epochs / g.prompts_per_step))
    opt_steps = total_steps * g.epochs * g.mini_batches
    stats = {"prompts": len(rows), "dropped_long_prompts": dropped, "steps": total_steps,
             "optimizer_steps": opt_steps, "completions_per_step": g.prompts_per_step * g.group_size}
    if dist.is_main:
        atomic_write_json(run_dir.path / "data_stats.json", stats)
    log(f"data: {len(rows)} prompts ({dropped} longer than {g.max_prompt_len} tokens dropped); {total_steps} steps of "
        f"{g.prompts_per_step} prompts x {g.group_size} completions"
        + (f"; dynamic sampling: up to {g.max_gen_batches} generation batches a step" if g.dynamic_sampling else ""))

    # --- policy, reference, engine
    def build(empty: bool):
        return models.load_causal_lm(cfg.model, device_type=dist.device.type, compute=cfg.train.precision, empty=empty)

    model = training.prepare_model(build, cfg.model, cfg.train, cfg.lora, cfg.launch, dist)
    model.train()
    ref_model = None
    if g.beta > 0 and not cfg.lora.enabled:
        # frozen; under FSDP2 sharded like the policy (its forwards are collective: every rank runs the same
        # number, on its equal share of the step's completions), else a full copy per process
        ref_model = training.prepare_model(build, cfg.model, cfg.train, cfg.lora, cfg.launch, dist, frozen=True)
    optimizer = training.build_optimizer(model, cfg.train)
    scheduler = training.build_scheduler(optimizer, cfg.train, opt_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    backend = resolve_backend(cfg.engine.backend)
    # the engine holds its own copy of the weights; push_weights refreshes it after every step. vLLM runs
    # colocated: one engine per process on its device (external launcher), tensor-parallel groups of
    # engine.tensor_parallel_size consecutive processes generating the same prompts together
    engine = HFEngine(cfg.model, cfg.engine, tokenizer=tokenizer) if backend == "hf" \
        else make_engine(cfg.model, cfg.engine, colocated=True)
    tp = cfg.engine.tensor_parallel_size if backend == "vllm" else 1
    tp_group = None
    if tp > 1:
        tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
            [list(range(start, start + tp)) for start in range(0, dist.world, tp)])
    log(f"model: {cfg.model.path}, trainable parameters {trainable:,} on {dist.world} process(es); rollouts on "
        f"{backend}; reference model: {'adapters off' if cfg.lora.enabled and g.beta > 0 else 'copy' if ref_model is not None else 'none (beta 0)'}"
        f"{' (sharded)' if ref_model is not None and dist.distributed and cfg.launch.preset == 'fsdp' else ''}")

    try:
        def push_weights() -> float:
            started = time.perf_counter()
            engine.load_weights(engine_weights(model, cfg.lora))
            return time.perf_counter() - started

        # --- resume: the prompts of each step and the schedule do not depend on the number of processes
        facts = {"prompts": len(rows), "prompts_per_step": g.prompts_per_step, "group_size": g.group_size,
                 "total_steps": total_steps}
        start_step = 0
        position = 0  # the data position: prompts drawn before this step (more than prompts_per_step a step with
        # dynamic sampling; saved with each checkpoint, so a resumed run draws the prompts an uninterrupted one does)
        latest = run_dir.latest_checkpoint()
        if latest is not None:
            moved = training.check_resume(latest, dist, facts, hint="resume on {world} process(es) with the recipe "
                                          "that wrote the checkpoint")
            state = training.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist)
            start_step = state["step"]
            position = state.get("prompt_position", start_step * g.prompts_per_step)  # older checkpoints: P a step
            log(f"resumed from {latest.name}: continuing at step {start_step}")
            if moved and dist.is_main:
                run_dir.update_meta(resumed_on_other_world=moved)
            push_weights()
        if dist.is_main:
            run_dir.truncate_metrics(start_step)

        def save(step: int) -> None:
            training.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     trainer_state={"rollout_step": step, "prompt_position": position, **facts},
                                     dist=dist,
                                     keep_last=cfg.output.keep_last_checkpoints, hf=cfg.output.save_hf_checkpoints,
                                     tokenizer=tokenizer, lora=cfg.lora, chat_template=tokenizer.chat_template)

        def ref_context():
            if cfg.lora.enabled:
                return training.unwrap(model).disable_adapter()
            return contextlib.nullcontext()

        def logprobs_of(items: list[dict[str, Any]], which) -> list[list[float]]:
            out: list[list[float]] = []
            with torch.no_grad(), training.autocast(cfg.train, dist, which):
                for i in range(0, len(items), cfg.train.micro_batch_size):
                    chunk = items[i:i + cfg.train.micro_batch_size]
                    batch = build_batch(chunk, tokenizer.pad_token_id, dist.device)
                    lp, _ = completion_logprobs(which, batch, g.temperature, chunk_tokens=cfg.train.logits_chunk_tokens)
                    out += [lp[r, :len(it["completion_ids"])].tolist() for r, it in enumerate(chunk)]
            return out

        sampling = SamplingConfig(n=g.group_size, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                  max_new_tokens=g.max_completion_len, stop=g.stop, logprobs=True)
        reward_names = list(cfg.rewards.weights)
        eps_low, eps_high = g.epsilon_low, cfg.epsilon_high
        is_mode = resolve_is_correction(g.is_correction, backend)
        log(f"mismatch correction: {is_mode}" + (f" ({g.is_level} level, cap {g.is_cap})" if is_mode != "none" else "")
            + (f"; stop when the mean engine/trainer log-prob gap exceeds {g.max_logprob_diff}" if g.max_logprob_diff
               else "; no gap check"))

        def engine_rows(chunk: list[dict[str, Any]], like):
            """The engine's log-probabilities of a micro-batch's sampled tokens, padded like `like` [B, T],
            and the mask of the positions it reported."""
            have = torch.zeros_like(like)
            for r, it in enumerate(chunk):
                if it["engine_logprobs"]:
                    have[r, :len(it["completion_ids"])] = 1.0
                elif is_mode != "none" and it["completion_ids"]:
                    raise EngineError(f"the {backend} engine returned no log-probabilities, which grpo.is_correction="
                                      f"{is_mode} needs", hint="set grpo.is_correction=none")
            values = [(it["engine_logprobs"] or [])[:len(it["completion_ids"])] for it in chunk]
            return _pad_rows(values, like), have

        def weigh(chunk: list[dict[str, Any]], old_t, active, meter: MismatchMeter | None):
            """IS weights of a micro-batch [B, T] (None when off) from the pre-update logp_old `old_t`;
            with `meter`, the gap and the weights are measured into it."""
            engine_t, have = engine_rows(chunk, old_t)
            weights = hit = None
            if is_mode != "none":
                weights, hit = importance_weights(old_t, engine_t, have, mode=is_mode, level=g.is_level, cap=g.is_cap,
                                                  floor=cfg.is_floor)
            if meter is not None:
                meter.add(old_t, engine_t, have, active, weights, hit, sequence=g.is_level == "sequence")
            return weights

        def check_gap(meter: MismatchMeter, step: int) -> tuple[float | None, float]:
            """The step's mean and largest gap over all processes; stops the run past grpo.max_logprob_diff."""
            gap_sum, gap_tokens = dist.all_reduce_sum([meter.gap_sum, meter.gap_tokens])
            (gap_max,) = _all_reduce_max(dist, [meter.gap_max])
            mean = gap_sum / gap_tokens if gap_tokens else None
            limit = g.max_logprob_diff
            if limit is not None and mean is not None and not mean <= limit:  # a nan gap stops the run too
                raise EngineError(
                    f"step {step + 1}: the engine's log-probabilities of the sampled tokens differ from the trainer's by "
                    f"{mean:.4g} nats on average (largest {gap_max:.4g}), above grpo.max_logprob_diff={limit}",
                    hint="the engine is not sampling from the model being trained: the weights pushed into it after "
                    "each step are wrong (a weight-sync bug), or its numerics differ from the trainer's (engine.dtype, "
                    "kernels, quantisation); raise grpo.max_logprob_diff, or set it to null, only if such a gap is expected")
            return mean, gap_max
        per_batch = g.prompts_per_step  # prompts per generation batch; a step trains on as many groups
        filter_flat = cfg.filters_groups

        def generate(chosen: list[int], step_sampling: SamplingConfig) -> list[list[Any]]:
            """Completions of this process's prompts `chosen` (row indices, also the prompts' sampling seeds)."""
            if tp_group is None:
                return engine.generate([rows[i]["messages"] for i in chosen], step_sampling, prompt_seeds=chosen)
            # a tensor-parallel engine: its processes generate the group's prompts together
            shares: list[Any] = [None] * tp
            torch.distributed.all_gather_object(shares, chosen, group=tp_group)
            together = [i for share in shares for i in share]
            outputs = engine.generate([rows[i]["messages"] for i in together], step_sampling, prompt_seeds=together)
            offset = sum(len(share) for share in shares[:dist.rank % tp])
            return outputs[offset:offset + len(chosen)]

        def score(chosen: list[int], samples: list[list[Any]]) -> list[list[dict[str, Any]]]:
            """One group of items per prompt, each completion with its reward: the reward functions' weighted
            sum plus DAPO's soft overlong punishment (in tokens; part of the reward, before any group is
            judged flat, and of `reward` in the metrics)."""
            items: list[dict[str, Any]] = []
            for idx, group in zip(chosen, samples):
                for smp in group:
                    items.append({"prompt_ids": rows[idx]["prompt_ids"], "completion_ids": list(smp.token_ids),
                                  "text": smp.text, "answer": rows[idx]["answer"],
                                  "truncated": smp.finish_reason == "length", "engine_logprobs": smp.logprobs,
                                  "prompt": rows[idx]["messages"][-1]["content"]})
            totals, per_fn = cfg.rewards.compute([it["prompt"] for it in items], [it["text"] for it in items],
                                                 [it["answer"] for it in items])
            overlong = overlong_penalties([len(it["completion_ids"]) for it in items], g.max_completion_len,
                                          g.overlong_buffer, g.overlong_penalty)
            for k, it in enumerate(items):
                it["reward"] = totals[k] + overlong[k]
                it["overlong"] = overlong[k]
                it["rewards"] = {name: per_fn[name][k] for name in reward_names}
            return [items[i:i + g.group_size] for i in range(0, len(items), g.group_size)]

        def all_flags(local: list[bool]) -> list[bool]:
            """Per group of a generation batch, over all processes in draw order (this process holds places
            rank, rank + world, ...): every process decides on the same flags."""
            values = [0.0] * per_batch
            for i, flag in enumerate(local):
                values[i * dist.world + dist.rank] = float(flag)
            return [v > 0.5 for v in dist.all_reduce_sum(values)]

        def take_groups(drawn: list[list[list[dict[str, Any]]]], picked: list[int]) -> list[list[dict[str, Any]]]:
            """This process's share of the step's groups: place j of `picked` (positions in draw order over the
            step's generation batches) goes to process j % world, as the prompts of a batch do. A group
            generated on another process is sent over (all processes take part, or none: `picked` is the same
            on all); without dynamic sampling every group stays where it was generated."""
            mine: dict[int, list[dict[str, Any]]] = {}
            outgoing: dict[int, list[dict[str, Any]]] = {}
            moves = False
            for j, pos in enumerate(picked):
                batch, k = divmod(pos, per_batch)
                owner = k % dist.world
                moves = moves or owner != j % dist.world
                if owner == dist.rank:
                    (mine if j % dist.world == dist.rank else outgoing)[j] = drawn[batch][k // dist.world]
            if moves:
                parts: list[Any] = [None] * dist.world
                torch.distributed.all_gather_object(parts, outgoing)
                for part in parts:
                    mine.update({j: grp for j, grp in part.items() if j % dist.world == dist.rank})
            return [mine[j] for j in range(dist.rank, len(picked), dist.world)]

        started = time.perf_counter()
        last: dict[str, Any] = {}

        with progress("grpo", total_steps) as advance:
            advance(start_step)
            for step in range(start_step, total_steps):
                record: dict[str, Any] = {"step": step + 1}
                # 1-2. rollouts (this process's share of the step's prompts) and rewards; with dynamic sampling,
                # batch after batch of new prompts until prompts_per_step groups have rewards that differ
                gen_s = reward_s = 0.0
                drawn: list[list[list[dict[str, Any]]]] = []  # per generation batch: this process's groups
                flat_drawn: list[bool] = []  # every group drawn, all processes, in draw order
                while True:
                    batch = len(drawn)
                    t0 = time.perf_counter()
                    chosen = plan.at(position + batch * per_batch, per_batch)[dist.rank::dist.world]
                    samples = generate(chosen, sampling.model_copy(
                        update={"seed": rollout_seed(cfg.train.seed, step, batch)}))
                    gen_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    drawn.append(score(chosen, samples))
                    reward_s += time.perf_counter() - t0
                    flat_drawn += all_flags([rewards_equal([it["reward"] for it in grp]) for grp in drawn[-1]])
                    varied = len(flat_drawn) - sum(flat_drawn)
                    if not g.dynamic_sampling or varied >= per_batch or len(drawn) >= g.max_gen_batches:
                        break
                engine.sleep()  # vLLM sleep mode: its memory goes to the trainer until the next push
                position += len(drawn) * per_batch
                if g.dynamic_sampling:
                    picked, kept = pick_groups(flat_drawn, per_batch)
                    if kept < per_batch:
                        warn(f"step {step + 1}: {kept} of {per_batch} groups have rewards that differ after "
                             f"grpo.max_gen_batches={g.max_gen_batches} generation batches; the step trains on those "
                             f"{kept} (its other places hold groups with equal rewards, which carry no loss)")
                else:
                    picked, kept = list(range(per_batch)), len(flat_drawn) - sum(flat_drawn)
                items = [it for grp in take_groups(drawn, picked) for it in grp]
                totals = [it["reward"] for it in items]

                # 3. advantages and masks
                advantages, flat = group_advantages(totals, g.group_size, cfg.std_scaling, g.advantage)
                for k, it in enumerate(items):
                    it["active"] = not ((filter_flat and flat[k]) or (g.mask_truncated and it["truncated"]))
                if g.advantage == "reinforce_pp":  # whitened over the step's loss-carrying tokens, every process's
                    advantages = batch_whiten(advantages, [float(len(it["completion_ids"])) * it["active"] for it in items],
                                              reduce=dist.all_reduce_sum)
                for k, it in enumerate(items):
                    it["advantage"] = advantages[k]

                # 4. optimisation
                t0 = time.perf_counter()
                model.eval()
                # logp_old: the trainer's log-probs of the rollout before any update of this step. With one
                # optimiser step per rollout they are the first forward's (detached); otherwise one extra pass.
                reuse_old = g.epochs * g.mini_batches == 1
                old = None if reuse_old else logprobs_of(items, model)
                refs = None
                if g.beta > 0:
                    with ref_context():
                        refs = logprobs_of(items, ref_model if ref_model is not None else model)
                model.train()
                logged = (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == total_steps  # entropy then only
                local_stats = {"kl": 0.0, "clipped": 0.0, "entropy": 0.0, "tokens": 0.0, "active_tokens": 0.0, "loss": 0.0}
                meter = MismatchMeter()
                gap: tuple[float | None, float] | None = None
                if not reuse_old:
                    # the engine/trainer gap and the gate come before the first of several optimiser steps
                    for m in range(0, len(items), cfg.train.micro_batch_size):
                        chunk = items[m:m + cfg.train.micro_batch_size]
                        lengths = torch.tensor([len(it["completion_ids"]) for it in chunk])
                        old_t = _pad_rows(old[m:m + len(chunk)], torch.zeros(len(chunk), int(lengths.max())))
                        active = (torch.arange(old_t.shape[1])[None, :] < lengths[:, None]).float() * torch.tensor(
                            [float(it["active"]) for it in chunk])[:, None]
                        weigh(chunk, old_t, active, meter)
                    gap = check_gap(meter, step)
                grad_norm = 0.0
                order_rng = random.Random(cfg.train.seed * 1_000_003 + step)
                for epoch in range(g.epochs):
                    order = list(range(len(items)))
                    if g.epochs > 1 or g.mini_batches > 1:
                        order_rng.shuffle(order)
                    size = len(order) // g.mini_batches
                    for mb in range(g.mini_batches):
                        part = order[mb * size:(mb + 1) * size]
                        active = [i for i in part if items[i]["active"]]
                        n_seq, n_tok = dist.all_reduce_sum([len(active), sum(len(items[i]["completion_ids"]) for i in active)])
                        for m in range(0, len(part), cfg.train.micro_batch_size):
                            chunk_ids = part[m:m + cfg.train.micro_batch_size]
                            chunk = [items[i] for i in chunk_ids]
                            batch = build_batch(chunk, tokenizer.pad_token_id, dist.device)
                            mask = batch["completion_mask"] * torch.tensor([float(it["active"]) for it in chunk],
                                                                          device=dist.device)[:, None]
                            first = epoch == 0  # statistics of the rollout policy: the first pass only
                            last = m + cfg.train.micro_batch_size >= len(part)  # gradients reduced then
                            with training.grad_sync(model, cfg.train, last=last):
                                with training.autocast(cfg.train, dist, model):
                                    logps, ent = completion_logprobs(model, batch, g.temperature,
                                                                    entropy=epoch == 0 and logged,
                                                                    chunk_tokens=cfg.train.logits_chunk_tokens)
                                old_t = logps.detach() if reuse_old else _pad_rows([old[i] for i in chunk_ids], logps)
                                weights = weigh(chunk, old_t, mask, meter if reuse_old else None)
                                ref_t = _pad_rows([refs[i] for i in chunk_ids], logps) if refs is not None else None
                                adv = torch.tensor([it["advantage"] for it in chunk], device=dist.device)
                                terms = token_losses(logps, old_t, adv, mask, epsilon_low=eps_low, epsilon_high=eps_high,
                                                     beta=g.beta, ref_logps=ref_t, is_weights=weights,
                                                     loss_type=g.loss_type)
                                loss = aggregate(terms["loss"], mask, g.loss_type, num_sequences=n_seq, num_tokens=n_tok,
                                                 max_completion_len=g.max_completion_len)
                                (loss * dist.world).backward()  # FSDP/DDP average over ranks; the loss is already global
                            if first:
                                full = batch["completion_mask"]
                                local_stats["loss"] += float(loss.detach())
                                local_stats["tokens"] += float(full.sum())
                                local_stats["active_tokens"] += float(mask.sum())
                                local_stats["clipped"] += float(terms["clipped"].sum())
                                if terms["kl"] is not None:
                                    local_stats["kl"] += float(terms["kl"].detach().sum())
                                if ent is not None:
                                    local_stats["entropy"] += float((ent * full).sum())
                        if gap is None:  # one optimiser step per rollout: measured in its forwards, gated before it
                            gap = check_gap(meter, step)
                        grad_norm = training.clip_grad_norm(model, cfg.train.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                train_s = time.perf_counter() - t0
                sync_s = push_weights()

                # 5. metrics (over all processes)
                # reward, accuracy, lengths...: the completions trained on; zero_std_groups_frac and the gen_*
                # values: every group generated in the step (the same thing without dynamic sampling)
                n_items = len(items)
                everything = [it for groups in drawn for grp in groups for it in grp]
                sums = dist.all_reduce_sum([
                    n_items, sum(totals), sum(t * t for t in totals),
                    *[sum(it["rewards"][name] for it in items) for name in reward_names],
                    sum(len(it["completion_ids"]) for it in items), sum(it["truncated"] for it in items),
                    sum(1 for it in items if it["active"]),
                    local_stats["tokens"], local_stats["active_tokens"], local_stats["clipped"], local_stats["kl"],
                    local_stats["entropy"], local_stats["loss"],
                    sum(it["rewards"]["correctness"] for it in items) if "correctness" in reward_names else 0.0,
                    meter.weight_sum, meter.weight_count, meter.hits,
                    no_answer_count([it["text"] for it in items]), sum(it["overlong"] for it in items),
                    len(everything), sum(it["reward"] for it in everything),
                    sum(it["rewards"]["correctness"] for it in everything) if "correctness" in reward_names else 0.0,
                ])
                count, r_sum, r_sq = sums[0], sums[1], sums[2]
                fn_sums = sums[3:3 + len(reward_names)]
                (len_sum, trunc, active_n, tok, active_tok, clipped, kl, entropy, loss_sum, correct,
                 weight_sum, weight_count, weight_hits, no_answer, overlong_sum, gen_count, gen_r_sum,
                 gen_correct) = sums[3 + len(reward_names):]
                zero_groups = sum(flat_drawn)
                weight_max, neg_weight_min = _all_reduce_max(dist, [meter.weight_max, -meter.weight_min])
                mean = r_sum / count
                record.update({
                    "reward": mean, "reward_std": math.sqrt(max(r_sq / count - mean * mean, 0.0)),
                    **{f"reward/{name}": s / count for name, s in zip(reward_names, fn_sums)},
                    "completion_len": len_sum / count, "truncated_frac": trunc / count,
                    "no_answer_frac": no_answer / count,  # completions the grader finds no answer in
                    "zero_std_groups_frac": zero_groups / len(flat_drawn), "active_frac": active_n / count,
                    "clip_frac": clipped / max(active_tok, 1), "loss": loss_sum / g.mini_batches,
                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "generation_s": gen_s, "reward_s": reward_s, "train_s": train_s, "weight_sync_s": sync_s,
                    "elapsed_s": time.perf_counter() - started,
                })
                if "correctness" in reward_names:
                    record["accuracy"] = correct / count
                if g.dynamic_sampling:
                    # the groups trained on are those whose rewards differ: their reward and accuracy lean away
                    # from all-right and all-wrong prompts; gen_reward / gen_accuracy are the policy's, over
                    # every completion generated in the step
                    record.update({"gen_batches": len(drawn), "groups_kept": kept, "groups_dropped": zero_groups,
                                   "groups_unused": len(flat_drawn) - zero_groups - kept, "prompts_drawn": position,
                                   "gen_reward": gen_r_sum / gen_count})
                    if "correctness" in reward_names:
                        record["gen_accuracy"] = gen_correct / gen_count
                if g.overlong_buffer:
                    record["overlong_penalty"] = overlong_sum / count  # mean over completions, <= 0
                if logged:
                    record["entropy"] = entropy / max(tok, 1)
                if g.beta > 0:
                    record["kl"] = kl / max(active_tok, 1)
                if gap[0] is not None:
                    record["logprob_diff"], record["logprob_diff_max"] = gap
                if weight_count:
                    record.update({"is_weight_mean": weight_sum / weight_count, "is_weight_min": -neg_weight_min,
                                   "is_weight_max": weight_max,
                                   f"is_{'clipped' if is_mode == 'tis' else 'masked'}_frac": weight_hits / weight_count})
                last = record
                done = step + 1
                if dist.is_main and (done % cfg.train.log_every_steps == 0 or done == total_steps):
                    run_dir.log_metrics(record)
                    if not console.is_terminal:
                        acc = f" accuracy {record['accuracy']:.3f}" if "accuracy" in record else ""
                        log(f"step {done}/{total_steps} reward {mean:.3f}{acc} len {record['completion_len']:.1f} "
                            f"gen {gen_s:.1f}s train {train_s:.1f}s")
                advance(1, reward=f"{mean:.3f}")
                if cfg.output.save_every_steps and done % cfg.output.save_every_steps == 0 and done != total_steps:
                    save(done)
    finally:
        engine.close()  # also on an error: a vLLM engine holds processes, memory and process groups
    train_seconds = time.perf_counter() - started

    if start_step < total_steps or run_dir.latest_checkpoint() is None:
        save(total_steps)
    training.save_hf(model, tokenizer, run_dir.final_dir, dist, lora=cfg.lora, chat_template=tokenizer.chat_template)
    summary: dict[str, Any] = {
        "status": "completed", "run_dir": str(run_dir.path), "final_dir": str(run_dir.final_dir), "steps": total_steps,
        "resumed_from_step": start_step, "train_seconds": round(train_seconds, 3), "world_size": dist.world,
        "backend": backend, "is_correction": is_mode, "data": stats,
    }
    if g.dynamic_sampling:
        summary["prompts_drawn"] = position  # the data position at the end: > steps x prompts_per_step when refilled
    if dist.is_main:
        metrics = [r for r in run_dir.read_metrics() if "reward" in r]
        if metrics:
            head, tail = metrics[: min(10, len(metrics))], metrics[-min(10, len(metrics)):]
            summary["reward_first10"] = sum(r["reward"] for r in head) / len(head)
            summary["reward_last10"] = sum(r["reward"] for r in tail) / len(tail)
            if g.dynamic_sampling:  # `reward` is the kept groups'; gen_reward the policy's over every completion
                summary["gen_reward_first10"] = sum(r["gen_reward"] for r in head) / len(head)
                summary["gen_reward_last10"] = sum(r["gen_reward"] for r in tail) / len(tail)
            summary["last"] = {k: v for k, v in last.items() if not k.endswith("_s")}
        if cfg.output.plots and metrics:
            series = [("reward", "mean reward")] + [(f"reward/{n}", n) for n in reward_names if len(reward_names) > 1]
            if g.dynamic_sampling:
                series.append(("gen_reward", "mean reward, every group generated"))
            if "accuracy" in metrics[0]:
                series.append(("accuracy", "accuracy"))
            training.plot_curves(metrics, series, run_dir.plots_dir / "reward.png", f"mathctl grpo: {run_dir.path.name}",
                                 "reward")
            training.plot_curves(metrics, [("completion_len", "completion tokens")], run_dir.plots_dir / "length.png",
                                 "completion length", "tokens")
            extra = [(k, k) for k in ("kl", "clip_frac", "entropy") if k in metrics[0]]
            training.plot_curves(metrics, extra, run_dir.plots_dir / "policy.png", "policy statistics", "value")
        run_dir.finish("completed", summary)
    training.close_distributed(dist)
    return summary


def _all_reduce_max(dist, values: list[float]) -> list[float]:
    """Element-wise max over processes."""
    if not dist.distributed:
        return values
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def _pad_rows(rows: list[list[float]], like):
    import torch

    out = torch.zeros_like(like)
    for r, values in enumerate(rows):
        out[r, :len(values)] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return out

