"""Reward models: `mathctl rm --recipe NAME [key=value ...]` with `rm.kind: outcome | process`.

Both kinds are a causal LM with a scalar head (`AutoModelForSequenceClassification`, one label: the
`score` linear layer on the last hidden state), so `final/` loads with `from_pretrained` and vLLM can
serve it as a reward model. A text is scored at its **last non-whitespace token**.

outcome  Bradley-Terry on (prompt, chosen, rejected): loss = -log sigmoid(s(prompt+chosen) - s(prompt+rejected)).
process  rStar-Math's process preference model (PPM): pairs of steps that share a prefix (the question and
         the steps before), the positive from a high-Q branch, the negative from a low-Q one; the same
         pairwise loss on s(prefix + pos) - s(prefix + neg). rStar weights each pair by
         1 / (pos_count * neg_count) (1 / (pos_count + neg_count) when one is 0) and sums over the batch
         (`rm.pair_weighting: counts`, `rm.loss_reduction: sum`); the default is the weighted mean, which
         keeps the learning rate independent of the batch size.

Steps and where the score is read: a step is a string that ends with its delimiter (rStar's
`<end_of_step>`, `<end_of_code>`, `<end_of_answer>`, or "\n" for plain-text steps). A trajectory is
the rendered prompt followed by its steps, concatenated as they are. The score of step k is the head's
value at the token holding step k's last non-whitespace character: the marker's last token for rStar
steps, the token before the newline for plain-text steps (`score_end`). One forward pass over the whole
trajectory scores every step (causal attention: a step's score sees only its prefix), which is exactly
what training optimises when it scores `prefix + step` at the same place.

Why not on the newline itself: a tiny model has to carry the step's result one extra token to the
newline before it can judge it, and on the synthetic arithmetic pairs that extra hop cost a 128-wide,
4-layer PPM (from the SFT policy, lr 1e-3, 700 steps) held-out accuracy 0.68 instead of 0.86.

Pair files (JSONL, one pair per line):
    process, ours     {"question", "prefix": [steps...] or "text", "pos", "neg", "pos_count"?, "neg_count"?}
                      (what `mathctl mcts-sample` writes as ppm_pairs.jsonl); the question goes through the
                      chat template, the steps follow as they are
    process, rStar    {"prompt", "pos", "neg", "pos_count", "neg_count"}: `prompt` is already the full text
                      (rStar's "<|user|>:" header plus the path), used verbatim
    outcome           {"prompt", "chosen", "rejected"}
    synthetic         arithmetic word problems (mathctl/synthetic.py): the positive step computes right, the
                      negative's result is off by 1-3 (process); a whole solution vs one with a wrong step
                      (outcome)

Scoring API for search and eval: `RewardScorer.from_pretrained(path)` with `score(prompt, steps)` /
`score_many` (per-step scores) and `score_outcome(prompt, response)` / `score_outcomes`, batched, on
CPU or GPU. `final/mathctl_rm.json` records the kind and how prompts are rendered.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mathctl.core.config import (
    LaunchConfig,
    LoraSpec,
    ModelSpec,
    OutputConfig,
    Strict,
    TrackingConfig,
    TrainBase,
    check_lora_launch,
)
from mathctl.core.console import console, log, progress
from mathctl.core.errors import ConfigError, DataError
from mathctl.core.rundir import RunDir
from mathctl.scoring import (  # noqa: F401 - the reward model at inference, importable from here as before
    RM_META,
    RewardScorer,
    _Capture,
    _positions_for_ends,
    forward_scores,
    make_eval_scorer,
    render_prompt,
    score_end,
    score_head,
    split_steps,
)

# --- config -----------------------------------------------------------------------------------


class SyntheticPairs(Strict):
    """Pairs made from the built-in arithmetic word problems."""

    num_problems: int = Field(1200, ge=2, description="Problems to make pairs from.")
    seed: int = Field(0, description="Generator seed.")
    max_digits: int = Field(1, ge=1, le=4, description="Digits per operand (1: the addition table is learnable by a tiny model).")
    max_ops: int = Field(3, ge=1, description="Most operations per problem (each gives a step pair).")


class RMData(Strict):
    source: str = Field("synthetic", description="`synthetic` or a JSONL pair file (see `mathctl rm --help`).")
    prompt_template: str = Field("{prompt}", description="User turn built from the question; `{prompt}` is replaced.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of questions held out (all their pairs), as rStar's 5%.")
    max_rows: int | None = Field(None, ge=1, description="Use only the first N pairs.")
    shuffle_seed: int = Field(42, description="Seed of the held-out split and the per-epoch order.")
    synthetic: SyntheticPairs = Field(default_factory=SyntheticPairs)


class RMSpec(Strict):
    kind: Literal["outcome", "process"] = Field("process", description="outcome (Bradley-Terry on responses) or "
                                                "process (rStar PPM on steps).")
    pair_weighting: Literal["none", "counts"] = Field(
        "counts", description="counts: rStar's 1/(pos_count*neg_count) per pair when the pair file has counts.")
    loss_reduction: Literal["mean", "sum"] = Field("mean", description="Weighted mean over a step's pairs, or rStar's sum.")
    head_init_std: float = Field(0.001, ge=0, description="Std of the new score head's weights (near zero, as rStar).")


class RMTrain(TrainBase):
    max_seq_len: int = Field(2048, ge=8, description="Tokens per scored text; longer ones keep their end (the step).")
    seed: int = Field(42, description="Head init / dropout seed.")


class RMConfig(Strict):
    """`mathctl rm` recipe."""

    step: Literal["rm"] = "rm"
    model: ModelSpec
    data: RMData = Field(default_factory=RMData)
    rm: RMSpec = Field(default_factory=RMSpec)
    train: RMTrain = Field(default_factory=RMTrain)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> RMConfig:
        if "{prompt}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}")
        check_lora_launch(self.lora, self.launch)
        return self

    def seeds(self) -> dict[str, int]:
        return {"train": self.train.seed, "data_shuffle": self.data.shuffle_seed, "synthetic": self.data.synthetic.seed}


# --- losses -------------------------------------------------------------------------------------


def pair_weights(pos_counts: list[int | None], neg_counts: list[int | None], weighting: str) -> list[float]:
    """rStar's per-pair weight: 1/(pos*neg), or 1/(pos+neg) when one count is 0; 1 without counts."""
    out = []
    for p, n in zip(pos_counts, neg_counts):
        if weighting != "counts" or p is None or n is None:
            out.append(1.0)
        elif p * n > 0:
            out.append(1.0 / (p * n))
        else:
            out.append(1.0 / max(p + n, 1))
    return out


def pairwise_loss(chosen, rejected, weights=None, reduction: str = "mean", normalizer: float | None = None):
    """-log sigmoid(chosen - rejected), weighted; `mean` divides by `normalizer` (default: the weights' sum)."""
    import torch

    losses = -torch.nn.functional.logsigmoid(chosen.float() - rejected.float())
    w = torch.ones_like(losses) if weights is None else torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    total = (losses * w).sum()
    if reduction == "sum":
        return total
    return total / (normalizer if normalizer is not None else w.sum())


# --- data ---------------------------------------------------------------------------------------


def synthetic_pairs(spec: SyntheticPairs, kind: str) -> list[dict[str, Any]]:
    from mathctl.synthetic import SyntheticSpec, generate

    problems = generate(SyntheticSpec(num_problems=spec.num_problems, seed=spec.seed, max_digits=spec.max_digits,
                                      min_ops=1, max_ops=spec.max_ops, ops="+-"))
    rng = random.Random(spec.seed)
    pairs = []
    for p in problems:
        lines = p["solution"].split("\n")
        steps = [line + "\n" for line in lines]
        for k, step in enumerate(steps):
            wrong = _corrupt(step, rng)
            if wrong is None:
                continue
            if kind == "process":
                pairs.append({"question": p["problem"], "prefix": steps[:k], "pos": step, "neg": wrong})
            else:
                bad = steps[:k] + [wrong] + steps[k + 1:]
                pairs.append({"prompt": p["problem"], "chosen": "".join(steps), "rejected": "".join(bad)})
                break  # one outcome pair per problem
    return pairs


def _corrupt(step: str, rng: random.Random) -> str | None:
    """The step with the result of its `a + b = c` / `a - b = c` changed by 1-3 (kept >= 0)."""
    import re

    match = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", step)
    if not match:
        return None
    value = int(match.group(4))
    choices = [value + d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
    wrong = rng.choice(choices)
    return step[:match.start(4)] + str(wrong) + step[match.end(4):]


PROCESS_OURS = ("question", "pos", "neg")
PROCESS_RSTAR = ("prompt", "pos", "neg")
OUTCOME = ("prompt", "chosen", "rejected")


def load_pairs(data: RMData, kind: str) -> list[dict[str, Any]]:
    """Pair rows, checked line by line (a bad line exits 2 naming it)."""
    if data.source == "synthetic":
        rows = synthetic_pairs(data.synthetic, kind)
        return rows[: data.max_rows] if data.max_rows else rows
    from mathctl.core.io import iter_jsonl

    path = Path(data.source).expanduser()
    if not path.is_file():
        raise DataError(f"pair file {path} does not exist", hint="set data.source to a JSONL pair file, or `synthetic`")
    rows = []
    for number, row in iter_jsonl(path):
        rows.append(_check_pair(row, kind, path, number))
        if data.max_rows and len(rows) >= data.max_rows:
            break
    if not rows:
        raise DataError(f"pair file {path} has no rows", hint="check the file")
    return rows


def _check_pair(row: dict[str, Any], kind: str, path: Path, number: int) -> dict[str, Any]:
    where = f"{path} line {number}"
    if kind == "process":
        layout = PROCESS_OURS if "question" in row else PROCESS_RSTAR
        expected = "question, prefix, pos, neg (mathctl) or prompt, pos, neg (rStar)"
    else:
        layout = OUTCOME
        expected = "prompt, chosen, rejected"
    missing = [f for f in layout if f not in row]
    if missing:
        raise DataError(f"{where}: no field '{missing[0]}' for a {kind} pair (fields: {', '.join(sorted(row)) or 'none'})",
                        hint=f"{kind} pairs need {expected}")
    for field in layout[1:]:
        if not isinstance(row[field], str) or not row[field].strip():
            raise DataError(f"{where}: field '{field}' must be a non-empty string", hint=f"{kind} pairs need {expected}")
    if not isinstance(row[layout[0]], str):
        raise DataError(f"{where}: field '{layout[0]}' must be a string", hint=f"{kind} pairs need {expected}")
    prefix = row.get("prefix", [])
    if isinstance(prefix, str):
        prefix = [prefix]
    if not isinstance(prefix, list) or not all(isinstance(s, str) for s in prefix):
        raise DataError(f"{where}: field 'prefix' must be a list of step strings or a string")
    for field in ("pos_count", "neg_count"):
        if field in row and row[field] is not None and (not isinstance(row[field], int) or row[field] < 0):
            raise DataError(f"{where}: field '{field}' must be a whole number >= 0")
    return {**row, "prefix": prefix}


def pair_texts(row: dict[str, Any], kind: str, tokenizer, template: str) -> tuple[str, str]:
    """The two full texts a pair compares."""
    if kind == "outcome":
        head = render_prompt(tokenizer, row["prompt"], template)
        return head + row["chosen"], head + row["rejected"]
    if "question" in row:
        head = render_prompt(tokenizer, row["question"], template) + "".join(row.get("prefix") or [])
    else:  # rStar's own format: the prompt is the rendered text already
        head = row["prompt"]
    return head + row["pos"], head + row["neg"]


def encode_pairs(rows: list[dict[str, Any]], cfg: RMConfig, tokenizer) -> tuple[list[dict[str, Any]], int]:
    """Token ids of both sides (kept from the end when too long: the scored step is at the end)."""
    texts = [pair_texts(r, cfg.rm.kind, tokenizer, cfg.data.prompt_template) for r in rows]
    flat = [t for pair in texts for t in pair]
    enc = tokenizer(flat, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # the score is read at the token holding the text's last non-whitespace character
    reads = [_positions_for_ends(offsets, [score_end(text)])[0] for text, offsets in zip(flat, enc["offset_mapping"])]
    limit = cfg.train.max_seq_len
    weights = pair_weights([r.get("pos_count") for r in rows], [r.get("neg_count") for r in rows],
                           cfg.rm.pair_weighting if cfg.rm.kind == "process" else "none")
    out, truncated = [], 0
    for k, row in enumerate(rows):
        a, b = ids[2 * k], ids[2 * k + 1]
        truncated += (len(a) > limit) + (len(b) > limit)
        cut_a, cut_b = max(len(a) - limit, 0), max(len(b) - limit, 0)
        out.append({"chosen": a[cut_a:], "rejected": b[cut_b:], "weight": weights[k],
                    "chosen_at": max(reads[2 * k] - cut_a, 0), "rejected_at": max(reads[2 * k + 1] - cut_b, 0),
                    "group": row.get("question", row.get("prompt", ""))})
    return out, truncated


def split_pairs(pairs: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole questions (all their pairs), so held-out accuracy is on unseen problems."""
    groups = sorted({p["group"] for p in pairs})
    random.Random(seed).shuffle(groups)
    held = set(groups[: int(round(len(groups) * fraction))]) if fraction > 0 else set()
    train = [p for p in pairs if p["group"] not in held]
    held_out = [p for p in pairs if p["group"] in held]
    return train, held_out


# --- model --------------------------------------------------------------------------------------


def load_reward_model(spec: ModelSpec, tokenizer, *, device_type: str = "cpu", init_std: float = 0.001, seed: int = 0,
                      compute: str = "fp32", empty: bool = False):
    """`AutoModelForSequenceClassification` with one label from a causal LM (new head, near-zero
    init) or from an earlier reward model (head kept). `empty`: parameters on the meta device, except a
    new head, initialised as here (`training.prepare_model` fills the rest shard by shard)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from mathctl import models

    name = models.resolve_model_path(spec.path)
    attn = models.pick_attn_implementation(spec.attn_implementation, device_type, compute)
    try:
        if empty:
            model = models.build_empty(AutoModelForSequenceClassification, name, spec, config_kwargs={"num_labels": 1},
                                       dtype=torch.float32, attn_implementation=attn)
            saved = models.safetensors_index(models.local_model_folder(spec)) or {}
            new_head = not any(k.split(".")[0] in ("score", "classifier") for k in saved)
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=1, revision=spec.revision, trust_remote_code=spec.trust_remote_code, dtype=torch.float32,
                attn_implementation=attn, output_loading_info=True)
            new_head = any(k.split(".")[0] in ("score", "classifier") for k in info.get("missing_keys", []))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {name} as a reward model: {str(exc).splitlines()[0]}",
                          hint="give a causal LM (a new score head is added) or an earlier mathctl rm final/") from None
    head = score_head(model)
    if new_head:
        if empty:
            head.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * init_std)
            if head.bias is not None:
                head.bias.zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --- run ----------------------------------------------------------------------------------------


def run(cfg: RMConfig, run_dir: RunDir) -> dict[str, Any]:
    import torch

    from mathctl import models, training
    from mathctl.core.io import atomic_write_json, atomic_write_text

    dist = training.init_distributed(cfg.launch)
    if dist.is_main:
        run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    training.set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    if dist.is_main:
        atomic_write_text(run_dir.path / "chat_template.jinja", tokenizer.chat_template)

    rows = load_pairs(cfg.data, cfg.rm.kind)
    pairs, truncated = encode_pairs(rows, cfg, tokenizer)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.shuffle_seed)
    plan = training.StepPlan(len(train_pairs), cfg.train, dist.world, cfg.data.shuffle_seed)
    stats = {"pairs": len(pairs), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
             "questions": len({p["group"] for p in pairs}), "truncated_texts": truncated, "kind": cfg.rm.kind}
    if dist.is_main:
        atomic_write_json(run_dir.path / "data_stats.json", stats)
    log(f"data: {len(train_pairs)} train pairs, {len(eval_pairs)} held out ({stats['questions']} questions); "
        f"{plan.total_steps} steps of {plan.global_batch} pairs")

    def build(empty: bool):
        return load_reward_model(cfg.model, tokenizer, device_type=dist.device.type, init_std=cfg.rm.head_init_std,
                                 seed=cfg.train.seed, compute=cfg.train.precision, empty=empty)

    # SEQ_CLS: the score head is trained in full beside the adapters
    model = training.prepare_model(build, cfg.model, cfg.train, cfg.lora, cfg.launch, dist, task_type="SEQ_CLS")
    capture = _Capture(model)
    model.train()
    optimizer = training.build_optimizer(model, cfg.train)
    scheduler = training.build_scheduler(optimizer, cfg.train, plan.total_steps)
    pad_id = tokenizer.pad_token_id
    log(f"model: {cfg.model.path} + score head ({cfg.rm.kind} reward model), "
        f"trainable parameters {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")

    start_step = 0
    latest = run_dir.latest_checkpoint()
    if latest is not None:
        moved = training.check_resume(latest, dist, plan.facts(), hint=plan.resume_hint())
        state = training.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist)
        start_step = state["step"]
        log(f"resumed from {latest.name}: continuing at step {start_step}")
        if moved and dist.is_main:
            run_dir.update_meta(resumed_on_other_world=moved)
    if dist.is_main:
        run_dir.truncate_metrics(start_step)

    def pair_scores(batch: list[dict[str, Any]]):
        seqs = [p["chosen"] for p in batch] + [p["rejected"] for p in batch]
        reads = [[p["chosen_at"]] for p in batch] + [[p["rejected_at"]] for p in batch]
        scores = forward_scores(model, capture, seqs, reads, pad_id, dist.device)
        return scores[: len(batch)], scores[len(batch):]

    def evaluate() -> dict[str, float] | None:
        if not eval_pairs:
            return None
        model.eval()
        loss_sum = correct = count = margin = 0.0
        with torch.no_grad(), training.autocast(cfg.train, dist, model):
            for chunk, weights in training.held_out_share(eval_pairs, dist, cfg.train.micro_batch_size):
                c, r = pair_scores(chunk)
                w = torch.tensor(weights, device=c.device)  # 0 for padding copies
                loss_sum += float(pairwise_loss(c, r, w, reduction="sum"))
                correct += float(((c > r).float() * w).sum())
                margin += float(((c - r).float() * w).sum())
                count += sum(weights)
        loss_sum, correct, count, margin = dist.all_reduce_sum([loss_sum, correct, count, margin])
        model.train()
        return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1),
                "eval_margin": margin / max(count, 1)}

    def save(step: int) -> None:
        training.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 trainer_state={"epoch": plan.epoch_of(step), **plan.facts()}, dist=dist,
                                 keep_last=cfg.output.keep_last_checkpoints, hf=cfg.output.save_hf_checkpoints,
                                 tokenizer=tokenizer, lora=cfg.lora, chat_template=tokenizer.chat_template)

    last: dict[str, Any] = {}
    last_eval: dict[str, float] | None = None
    started = time.perf_counter()
    weights_all = [p["weight"] for p in train_pairs]
    if start_step == 0 and cfg.train.eval_every_steps:
        first = evaluate()  # the untrained head: the start of the accuracy curve
        if first is not None and dist.is_main:
            run_dir.log_metrics({"step": 0, **first})
    with progress("rm", plan.total_steps) as advance:
        advance(start_step)
        for step in range(start_step, plan.total_steps):
            global_indices = plan.step_indices(step)
            normalizer = sum(weights_all[i] for i in global_indices)
            step_loss = step_correct = 0.0
            micro = plan.micro_batches(step, dist.rank)
            for j, indices in enumerate(micro):
                batch = [train_pairs[i] for i in indices]
                with training.grad_sync(model, cfg.train, last=j == len(micro) - 1):
                    with training.autocast(cfg.train, dist, model):
                        c, r = pair_scores(batch)
                    loss = pairwise_loss(c, r, [p["weight"] for p in batch], cfg.rm.loss_reduction, normalizer)
                    (loss * dist.world).backward()  # FSDP/DDP average over ranks; the loss is already global
                step_loss += float(loss.detach())
                step_correct += float((c.detach() > r.detach()).sum())
            grad_norm = training.clip_grad_norm(model, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            step_loss, step_correct = dist.all_reduce_sum([step_loss, step_correct])
            last = {"loss": step_loss, "accuracy": step_correct / len(global_indices)}
            record: dict[str, Any] | None = None
            if done % cfg.train.log_every_steps == 0 or done == plan.total_steps:
                record = {"step": done, "epoch": round(plan.epoch_of(done), 4), **last,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "elapsed_s": time.perf_counter() - started}
            if (cfg.train.eval_every_steps and done % cfg.train.eval_every_steps == 0) or done == plan.total_steps:
                last_eval = evaluate()
                if last_eval is not None:
                    record = (record or {"step": done}) | last_eval
            if record is not None and dist.is_main:
                run_dir.log_metrics(record)
                if not console.is_terminal:
                    extra = f" eval_accuracy {record['eval_accuracy']:.3f}" if "eval_accuracy" in record else ""
                    log(f"step {done}/{plan.total_steps} loss {last['loss']:.4f}{extra}")
            advance(1, loss=f"{last['loss']:.4f}")
            if cfg.output.save_every_steps and done % cfg.output.save_every_steps == 0 and done != plan.total_steps:
                save(done)
    train_seconds = time.perf_counter() - started
    capture.close()

    if start_step < plan.total_steps or run_dir.latest_checkpoint() is None:
        save(plan.total_steps)
    training.save_hf(model, tokenizer, run_dir.final_dir, dist, lora=cfg.lora, chat_template=tokenizer.chat_template)
    summary: dict[str, Any] = {
        "status": "completed", "run_dir": str(run_dir.path), "final_dir": str(run_dir.final_dir), "kind": cfg.rm.kind,
        "steps": plan.total_steps, "resumed_from_step": start_step, "train_loss": last.get("loss"),
        "train_accuracy": last.get("accuracy"), **(last_eval or {}), "train_seconds": round(train_seconds, 3),
        "world_size": dist.world, "data": stats,
    }
    if dist.is_main:
        atomic_write_json(run_dir.final_dir / RM_META, {"kind": cfg.rm.kind, "prompt_template": cfg.data.prompt_template,
                                                       "score": "head value at the last non-whitespace token of the text / each step"})
        if cfg.output.plots:
            metrics = run_dir.read_metrics()
            training.plot_curves(metrics, [("loss", "train loss"), ("eval_loss", "held-out loss")],
                                 run_dir.plots_dir / "loss.png", f"mathctl rm: {run_dir.path.name}")
            training.plot_curves(metrics, [("accuracy", "train pairwise accuracy"),
                                           ("eval_accuracy", "held-out pairwise accuracy")],
                                 run_dir.plots_dir / "accuracy.png", "pairwise accuracy", "accuracy")
        run_dir.finish("completed", summary)
    training.close_distributed(dist)
    return summary
