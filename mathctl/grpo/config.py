"""The `mathctl grpo` recipe: data, algorithm and training keys (see the package docstring)."""

from __future__ import annotations

from typing import Literal

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
from mathctl.rewards import RewardsConfig
from mathctl.rows import SyntheticData

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
