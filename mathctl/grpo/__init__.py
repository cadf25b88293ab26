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

from mathctl.grpo.config import GRPOConfig, GRPOData, GRPOSpec, GRPOTrain
from mathctl.grpo.objective import (
    ADV_EPS,
    LOG_RATIO_BOUND,
    MismatchMeter,
    aggregate,
    batch_whiten,
    group_advantages,
    importance_weights,
    overlong_penalties,
    resolve_is_correction,
    rewards_equal,
    token_losses,
)
from mathctl.grpo.rollout import (
    PromptPlan,
    build_batch,
    completion_logprobs,
    engine_weights,
    load_prompts,
    pick_groups,
    rollout_seed,
)
from mathctl.grpo.train import run

__all__ = ["ADV_EPS", "LOG_RATIO_BOUND", "GRPOConfig", "GRPOData", "GRPOSpec", "GRPOTrain", "MismatchMeter", "PromptPlan",
           "aggregate", "batch_whiten", "build_batch", "completion_logprobs", "engine_weights", "group_advantages",
           "importance_weights", "load_prompts", "overlong_penalties", "pick_groups", "resolve_is_correction",
           "rewards_equal", "rollout_seed", "run", "token_losses"]
