"""The GRPO training loop (`run`): rollouts, rewards, advantages, optimiser steps and weight pushes."""

from __future__ import annotations

import math
import random
import time
from typing import Any

from mathctl.core.console import console, log, progress, warn
from mathctl.core.errors import DataError, EngineError
from mathctl.core.rundir import RunDir
from mathctl.grpo.config import GRPOConfig
from mathctl.grpo.objective import (
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
from mathctl.rewards import no_answer_count

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
