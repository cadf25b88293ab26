"""Supervised fine-tuning: `mathctl sft --recipe NAME [key=value ...]`.

Reads conversations (or problem/solution pairs), renders them with the recipe's chat template,
masks the loss to the assistant's tokens (or the whole completion with its header), and trains a
causal LM with full weights or LoRA. Micro-batches are padding-free by default: the samples of a
micro-batch form one row with per-sample position ids and boundaries, and attention runs within
each sample only (flash-attn's varlen kernel when installed, else sdpa per sample, see
attention.py); eager attention packs rows with a block-causal mask instead (see `collate`).
Packed samples never see each other. The loss is the token mean over the whole optimiser step (all micro-batches,
all processes), so it does not depend on how a step is split.

Phases: setup -> data -> model -> loop (forward/backward, step, log, eval, checkpoint) -> final/.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, model_validator

from mathctl.core.config import (
    LaunchConfig,
    LMTrainBase,
    LoraSpec,
    ModelSpec,
    OutputConfig,
    Strict,
    TrackingConfig,
    check_lora_launch,
)
from mathctl.core.console import console, log, progress
from mathctl.core.errors import DataError
from mathctl.core.rundir import RunDir
from mathctl.rows import (  # noqa: F401 - the shared data pieces, importable from here as before
    IGNORE,
    SyntheticData,
    conversation_spans,
    label_tokens,
    load_rows,
    tokenize_conversation,
    tokenize_conversations,
)

VARLEN_ATTENTION = ("flash_attention_2", "mathctl_varlen")


# --- config ---------------------------------------------------------------------------------
class SFTData(Strict):
    """Where training conversations come from and how rows become messages."""

    source: str = Field(
        description="`synthetic`; a .jsonl/.json/.parquet file; a folder written by `mathctl data` (save_to_disk) "
        "or holding data files; or a hub dataset id."
    )
    subset: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Split of a hub dataset or data folder.")
    messages_field: str | None = Field(None, description="Field holding chat messages; auto-detected (`messages`).")
    prompt_field: str | None = Field(None, description="Field holding the problem; auto: problem, question, query, prompt.")
    response_field: str | None = Field(
        None, description="Field holding the target; auto: generated_solution, solution, response, completion, answer."
    )
    prompt_template: str = Field("{prompt}", description="User turn built from the prompt field; `{prompt}` is replaced.")
    system_prompt: str | None = Field(None, description="Optional system message put first.")
    max_rows: int | None = Field(None, ge=1, description="Use only the first N rows (after loading, before the eval split).")
    eval_rows: int = Field(0, ge=0, description="Rows held out for eval loss (taken from the end after a seeded shuffle).")
    shuffle_seed: int = Field(42, description="Seed of the held-out split and of the per-epoch order.")
    num_proc: int | None = Field(None, ge=1, description="Processes for tokenisation (datasets.map).")
    synthetic: SyntheticData = Field(default_factory=SyntheticData)


class SFTTrain(LMTrainBase):
    """SFT-specific training settings on top of the shared optimiser/schedule ones."""

    max_seq_len: int = Field(2048, ge=8, description="Tokens per sample; longer samples are truncated (counted in stats).")
    packing: bool = Field(
        True, description="Pack micro-batches: one varlen row with flash-attn, rows of up to max_seq_len tokens "
        "with a block-causal mask otherwise; false pads every sample to the longest."
    )
    loss_on: Literal["assistant", "completion", "all"] = Field(
        "assistant",
        description="assistant: the assistant's content and end-of-turn tokens; completion: also the assistant "
        "header the template puts before it; all: every token.",
    )
    seed: int = Field(42, description="Model init/dropout seed.")
    eval_at_start: bool = Field(
        False, description="Also measure the held-out loss before the first step (metrics.jsonl: step 0), so its "
        "curve starts from the starting model's own value."
    )


class SFTConfig(Strict):
    """`mathctl sft` recipe."""

    step: Literal["sft"] = "sft"
    model: ModelSpec
    data: SFTData
    train: SFTTrain = Field(default_factory=SFTTrain)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        syn = self.data.synthetic
        if syn.min_ops > syn.max_ops:
            raise ValueError(f"data.synthetic.min_ops ({syn.min_ops}) exceeds max_ops ({syn.max_ops}); lower min_ops")
        if "{prompt}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}; e.g. '{prompt}\\nShow your steps.'")
        check_lora_launch(self.lora, self.launch)
        return self

    def seeds(self) -> dict[str, int]:
        return {"train": self.train.seed, "data_shuffle": self.data.shuffle_seed, "synthetic": self.data.synthetic.seed}


# --- data: rows -> messages -----------------------------------------------------------------
_PROMPT_FIELDS = ("problem", "question", "query", "prompt", "instruction")
_RESPONSE_FIELDS = ("generated_solution", "solution", "response", "completion", "output", "answer")


def row_to_messages(row: dict[str, Any], data: SFTData, index: int) -> list[dict[str, str]]:
    """One row as chat messages, from a messages field or a prompt/response pair."""
    field = data.messages_field or ("messages" if "messages" in row else None)
    if field:
        messages = row.get(field)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"row {index + 1}: field {field} is not a list of {{role, content}} messages",
                            hint="fix the row or set data.messages_field")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt_key = data.prompt_field or next((k for k in _PROMPT_FIELDS if k in row), None)
        response_key = data.response_field or next((k for k in _RESPONSE_FIELDS if k in row and k != prompt_key), None)
        if prompt_key not in row or response_key not in row:
            raise DataError(f"row {index + 1}: cannot find prompt/response fields (has {sorted(row)})",
                            hint="set data.prompt_field and data.response_field, or data.messages_field")
        messages = [{"role": "user", "content": data.prompt_template.replace("{prompt}", str(row[prompt_key]))},
                    {"role": "assistant", "content": str(row[response_key])}]
    if data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}] + messages
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"row {index + 1}: no assistant message to train on", hint="every row needs an assistant turn")
    return messages


def prepare_examples(cfg: SFTConfig, tokenizer) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Train and held-out examples ({input_ids, labels}) plus statistics."""
    import random

    rows = load_rows(cfg.data.source, synthetic=cfg.data.synthetic, subset=cfg.data.subset, split=cfg.data.split)
    if cfg.data.max_rows:
        rows = rows[: cfg.data.max_rows]
    if not rows:
        raise DataError(f"data source {cfg.data.source} has no rows", hint="check data.source and data.split")
    if rows and "seq_lens" in rows[0]:  # packed by `mathctl data prepare --pack`: back to samples, packed at run time
        rows = [{"input_ids": r["input_ids"][start:start + n], "labels": r["labels"][start:start + n]}
                for r in rows for start, n in zip(_offsets(r["seq_lens"]), r["seq_lens"])]
    if rows and "input_ids" in rows[0] and "labels" in rows[0]:
        examples = [{"input_ids": list(r["input_ids"])[: cfg.train.max_seq_len],
                     "labels": list(r["labels"])[: cfg.train.max_seq_len],
                     "truncated": len(r["input_ids"]) > cfg.train.max_seq_len, "length": len(r["input_ids"])}
                    for r in rows]
    else:
        conversations = [row_to_messages(row, cfg.data, i) for i, row in enumerate(rows)]
        examples = _tokenize_all(conversations, tokenizer, cfg)
    kept = [e for e in examples if any(label != IGNORE for label in e["labels"][1:])]
    stats = {
        "rows": len(rows), "dropped_no_trained_tokens": len(examples) - len(kept),
        "truncated": sum(e["truncated"] for e in examples),
        "tokens": sum(len(e["input_ids"]) for e in kept),
        "trained_tokens": sum(sum(label != IGNORE for label in e["labels"]) for e in kept),
    }
    if not kept:
        raise DataError("no row has a token to train on after truncation",
                        hint="raise train.max_seq_len or check train.loss_on and the data")
    order = list(range(len(kept)))
    random.Random(cfg.data.shuffle_seed).shuffle(order)
    held = set(order[len(order) - cfg.data.eval_rows:]) if cfg.data.eval_rows else set()
    train = [e for i, e in enumerate(kept) if i not in held]
    evaluation = [e for i, e in enumerate(kept) if i in held]
    stats.update(train_rows=len(train), eval_rows=len(evaluation))
    return train, evaluation, stats


def _offsets(lengths: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts


def _tokenize_all(conversations: list[list[dict]], tokenizer, cfg: SFTConfig) -> list[dict]:
    if cfg.data.num_proc and cfg.data.num_proc > 1 and len(conversations) > 1000:
        import datasets

        ds = datasets.Dataset.from_dict({"messages": conversations})
        ds = ds.map(lambda row: tokenize_conversation(row["messages"], tokenizer, cfg.train.loss_on, cfg.train.max_seq_len),
                    num_proc=cfg.data.num_proc, remove_columns=["messages"], desc="tokenizing")
        return ds.to_list()
    out: list[dict] = []
    with progress("tokenizing", len(conversations)) as advance:
        for start in range(0, len(conversations), 256):
            chunk = conversations[start:start + 256]
            out += tokenize_conversations(chunk, tokenizer, cfg.train.loss_on, cfg.train.max_seq_len)
            advance(len(chunk))
    return out


# --- batches --------------------------------------------------------------------------------
def targets_of(labels: list[int]) -> list[int]:
    """Next-token targets of one sample: position t predicts labels[t+1]; the last predicts nothing."""
    return labels[1:] + [IGNORE]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: sample indices grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(examples: list[dict], *, packing: bool, pad_id: int, attn_implementation: str,
            row_capacity: int | None = None) -> dict[str, Any]:
    """Tensors for one micro-batch. `targets` are shifted per sample, so a packed row never asks one
    sample to predict the next sample's first token.

    - padded (packing off): [B, T] rows padded to the longest, with a 2-D attention mask.
    - flash_attention_2 / mathctl_varlen: one row [1, T] of all samples with per-sample position ids
      and sample boundaries (`cu_seq_lens_*`); attention runs within each sample only, so nothing is
      spent on padding or masked blocks. Training on sdpa uses mathctl_varlen (see attention.py).
    - sdpa/eager with a mask: samples are packed first-fit into rows of at most `row_capacity`
      tokens with a block-causal 4-D mask and per-sample position ids. Rows are bounded because
      these kernels cannot skip masked blocks: one row of all samples would cost attention
      quadratic in the whole micro-batch.
    """
    import torch

    if not packing:
        width = max(len(e["input_ids"]) for e in examples)
        ids = [e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in examples]
        targets = [targets_of(e["labels"]) + [IGNORE] * (width - len(e["labels"])) for e in examples]
        mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        return {"input_ids": torch.tensor(ids), "targets": torch.tensor(targets), "attention_mask": torch.tensor(mask)}
    lengths = [len(e["input_ids"]) for e in examples]
    varlen = attn_implementation in VARLEN_ATTENTION
    if varlen:
        groups = [list(range(len(examples)))]
    else:
        groups = pack_rows(lengths, max(row_capacity or 0, max(lengths)))
    width = max(sum(lengths[i] for i in group) for group in groups)
    ids, targets, positions, segments = [], [], [], []
    for group in groups:
        row_ids, row_targets, row_pos, row_seg = [], [], [], []
        for k, i in enumerate(group):
            row_ids += examples[i]["input_ids"]
            row_targets += targets_of(examples[i]["labels"])
            row_pos += list(range(lengths[i]))
            row_seg += [k] * lengths[i]
        pad = width - len(row_ids)
        # padding forms its own segment so no query row is fully masked (NaN in sdpa)
        ids.append(row_ids + [pad_id] * pad)
        targets.append(row_targets + [IGNORE] * pad)
        positions.append(row_pos + list(range(pad)))
        segments.append(row_seg + [len(group)] * pad)
    batch = {"input_ids": torch.tensor(ids), "targets": torch.tensor(targets),
             "position_ids": torch.tensor(positions)}  # [R, T]
    if varlen:  # sample boundaries, as flash-attn's varlen kernel (and mathctl_varlen) take them
        bounds = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths), max_length_k=max(lengths))
    else:
        seg = torch.tensor(segments)  # [R, T]
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        allowed = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]  # [R, 1, T, T]
        if attn_implementation == "eager":  # eager adds the mask to the scores: it must be additive
            allowed = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        batch["attention_mask"] = allowed
    return batch


def token_nll_sum(model, batch: dict[str, Any], device, chunk_tokens: int | None = 1024) -> Any:
    """Sum of next-token negative log-likelihoods over trained positions (fp32 log-softmax).

    Only positions that have a target go through the LM head (`logits_to_keep`), which saves the
    [T, V] projection and its memory for prompt tokens; models whose forward lacks that argument
    (some remote-code models) compute all logits. With `chunk_tokens` the head works that many positions
    at a time (mathctl/losses.py): no [T, V] fp32 logits are held; None (or a model that changes its logits
    after the head) takes the full-logits path.
    """
    import torch

    from mathctl import losses

    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items() if k != "targets"}
    targets = batch["targets"].to(device)  # [B, T]
    if _accepts_logits_to_keep(model):
        keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)  # [K] positions with a target in any row
        inputs["logits_to_keep"] = keep
        targets = targets[:, keep]
    if chunk_tokens and losses.chunked_head_supported(model):
        with losses.head_logprobs(model, targets, chunk_tokens=chunk_tokens) as head:
            model(**inputs, use_cache=False)
        return -head.logprobs.sum()
    logits = model(**inputs, use_cache=False).logits  # [B, K, V]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                             reduction="sum")


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    inner = model
    while True:  # peel DDP and peft wrappers; FSDP2 keeps the class's own forward
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and type(inner).__name__ == "DistributedDataParallel":
            inner = inner.module
        else:
            break
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def count_targets(examples: list[dict]) -> int:
    return sum(sum(1 for t in targets_of(e["labels"]) if t != IGNORE) for e in examples)


# --- run ------------------------------------------------------------------------------------
def run(cfg: SFTConfig, run_dir: RunDir) -> dict[str, Any]:
    """Train as the recipe says; returns the run summary (also written to summary.json)."""
    import torch

    from mathctl import models, training
    from mathctl.core.io import atomic_write_json, atomic_write_text

    # --- setup
    dist = training.init_distributed(cfg.launch)
    if dist.is_main:
        run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    training.set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    chat_template = tokenizer.chat_template
    if dist.is_main:
        atomic_write_text(run_dir.path / "chat_template.jinja", chat_template)

    # --- data
    train_examples, eval_examples, stats = prepare_examples(cfg, tokenizer)
    plan = training.StepPlan(len(train_examples), cfg.train, dist.world, cfg.data.shuffle_seed)
    target_counts = [count_targets([e]) for e in train_examples]  # once, not per step
    if dist.is_main:
        atomic_write_json(run_dir.path / "data_stats.json", stats)
    log(f"data: {stats['train_rows']} train rows, {stats['eval_rows']} held out, {stats['truncated']} truncated; "
        f"{plan.total_steps} steps of {plan.global_batch} samples")

    # --- model
    attn = models.pick_attn_implementation(cfg.model.attn_implementation, dist.device.type, cfg.train.precision)
    packed_sdpa = cfg.train.packing and attn == "sdpa"  # padding-free without flash-attn: sdpa per packed sample
    if packed_sdpa:
        from mathctl import attention

        attn = attention.register()

    def build(empty: bool):
        model = models.load_causal_lm(cfg.model, device_type=dist.device.type, compute=cfg.train.precision, empty=empty)
        if packed_sdpa:
            model.set_attn_implementation(attn)
        return model

    model = training.prepare_model(build, cfg.model, cfg.train, cfg.lora, cfg.launch, dist)
    model.train()
    optimizer = training.build_optimizer(model, cfg.train)
    scheduler = training.build_scheduler(optimizer, cfg.train, plan.total_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {cfg.model.path} ({attn}), trainable parameters {trainable:,} "
        f"on {dist.world} process(es), {dist.device.type}, {cfg.train.precision}")

    # --- resume
    start_step, tokens_seen = 0, 0
    latest = run_dir.latest_checkpoint()
    if latest is not None:
        moved = training.check_resume(latest, dist, plan.facts(), hint=plan.resume_hint())
        state = training.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist)
        start_step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        if moved and dist.is_main:
            run_dir.update_meta(resumed_on_other_world=moved)
        log(f"resumed from {latest.name}: continuing at step {start_step}")
    if dist.is_main:
        run_dir.truncate_metrics(start_step)

    def save(step: int) -> None:
        training.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 trainer_state={"tokens_seen": tokens_seen, "epoch": plan.epoch_of(step),
                                                **plan.facts()},
                                 dist=dist, keep_last=cfg.output.keep_last_checkpoints, hf=cfg.output.save_hf_checkpoints,
                                 tokenizer=tokenizer, lora=cfg.lora, chat_template=chat_template)

    def evaluate() -> float | None:
        if not eval_examples:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), training.autocast(cfg.train, dist, model):
            for chunk, weights in training.held_out_share(eval_examples, dist, cfg.train.micro_batch_size):
                # a padding copy (weight 0) trains nothing: every label ignored
                chunk = [e if w else {**e, "labels": [IGNORE] * len(e["labels"])} for e, w in zip(chunk, weights)]
                batch = collate(chunk, packing=cfg.train.packing, pad_id=tokenizer.pad_token_id, attn_implementation=attn,
                                row_capacity=cfg.train.max_seq_len)
                total += float(token_nll_sum(model, batch, dist.device, cfg.train.logits_chunk_tokens))
                count += count_targets(chunk)
        total, count = dist.all_reduce_sum([total, count])
        model.train()
        return total / max(count, 1)

    # --- loop
    last_loss, last_eval, start_eval = None, None, None
    if cfg.train.eval_at_start and start_step == 0 and eval_examples:
        start_eval = evaluate()
        if dist.is_main:
            run_dir.log_metrics({"step": 0, "eval_loss": start_eval})
            log(f"step 0 eval_loss {start_eval:.4f}")
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    with progress("sft", plan.total_steps) as advance:
        advance(start_step)
        for step in range(start_step, plan.total_steps):
            micro = plan.micro_batches(step, dist.rank)
            # token-mean over the whole step: every rank counts the global batch's targets itself
            global_targets = sum(target_counts[i] for i in plan.step_indices(step))
            step_loss = 0.0
            for j, indices in enumerate(micro):
                examples = [train_examples[i] for i in indices]
                batch = collate(examples, packing=cfg.train.packing, pad_id=tokenizer.pad_token_id, attn_implementation=attn,
                                row_capacity=cfg.train.max_seq_len)
                with training.grad_sync(model, cfg.train, last=j == len(micro) - 1):
                    with training.autocast(cfg.train, dist, model):
                        nll = token_nll_sum(model, batch, dist.device, cfg.train.logits_chunk_tokens)
                    # FSDP/DDP average gradients over ranks; scale by world so the result is the global token mean
                    (nll * dist.world / global_targets).backward()
                step_loss += float(nll.detach())
                window_tokens += sum(len(e["input_ids"]) for e in examples)
            grad_norm = training.clip_grad_norm(model, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += global_targets
            done = step + 1
            (step_loss,) = dist.all_reduce_sum([step_loss])
            last_loss = step_loss / global_targets
            record: dict[str, Any] | None = None
            if done % cfg.train.log_every_steps == 0 or done == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                (window_all,) = dist.all_reduce_sum([window_tokens])
                record = {"step": done, "epoch": round(plan.epoch_of(done), 4), "loss": last_loss,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "trained_tokens": tokens_seen,
                          "tokens_per_s": window_all / max(elapsed, 1e-9), "elapsed_s": time.perf_counter() - started}
                window_tokens, window_start = 0, time.perf_counter()
            if cfg.train.eval_every_steps and done % cfg.train.eval_every_steps == 0 and done != plan.total_steps:
                last_eval = evaluate()
                record = (record or {"step": done}) | {"eval_loss": last_eval}
            if done == plan.total_steps:
                last_eval = evaluate()
                if last_eval is not None:
                    record = (record or {"step": done}) | {"eval_loss": last_eval}
            if record is not None and dist.is_main:
                run_dir.log_metrics(record)
                if not console.is_terminal:  # no live bar (CI, Slurm logs): one line per logged step
                    extra = f" eval_loss {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else ""
                    log(f"step {done}/{plan.total_steps} loss {last_loss:.4f} lr {scheduler.get_last_lr()[0]:.3g}{extra}")
            advance(1, loss=f"{last_loss:.4f}")
            if cfg.output.save_every_steps and done % cfg.output.save_every_steps == 0 and done != plan.total_steps:
                save(done)
    train_seconds = time.perf_counter() - started

    # --- final
    if start_step < plan.total_steps or run_dir.latest_checkpoint() is None:
        save(plan.total_steps)
    training.save_hf(model, tokenizer, run_dir.final_dir, dist, lora=cfg.lora, chat_template=chat_template)
    summary: dict[str, Any] = {
        "status": "completed", "run_dir": str(run_dir.path), "final_dir": str(run_dir.final_dir),
        "steps": plan.total_steps, "resumed_from_step": start_step, "train_loss": last_loss, "eval_loss": last_eval,
        **({"eval_loss_start": start_eval} if start_eval is not None else {}),
        "trained_tokens": tokens_seen, "train_seconds": round(train_seconds, 3), "world_size": dist.world,
        "data": stats,
    }
    if dist.is_main:
        metrics = run_dir.read_metrics()
        steps_run = [r for r in metrics if "tokens_per_s" in r and r["step"] > start_step]
        if steps_run:
            summary["tokens_per_s"] = sum(r["tokens_per_s"] for r in steps_run) / len(steps_run)
        if cfg.output.plots:
            training.plot_curves(metrics, [("loss", "train loss"), ("eval_loss", "held-out loss")],
                                 run_dir.plots_dir / "loss.png", f"mathctl sft: {run_dir.path.name}")
            training.plot_curves(metrics, [("lr", "learning rate")], run_dir.plots_dir / "lr.png", "learning rate", "lr")
        run_dir.finish("completed", summary)
    training.close_distributed(dist)
    return summary
