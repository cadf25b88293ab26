"""Direct preference optimisation: `mathctl dpo --recipe NAME [key=value ...]`.

Trains a causal LM on preference pairs (a prompt, a chosen and a rejected response) so that the
chosen response gains probability relative to the rejected one, measured against a frozen reference
(the starting model). No reward model and no sampling during training. `dpo.loss_type`:

    sigmoid   DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with
              pi and ref the log-probabilities of a whole response, summed over its tokens.
    dpo_norm  the same with log-probabilities averaged over each response's tokens (open-instruct's
              default, used by Tulu 3 with beta 5): long responses no longer dominate the difference.
    ipo       IPO (Azar et al. 2023): (h - 1/(2 beta))^2 with h the difference of the per-token averaged
              log-ratios, as TRL computes it (the averaging is what the IPO authors used in their runs).
    simpo     SimPO (Meng et al. 2024), no reference: -log sigmoid(beta * (avg_c - avg_r) - gamma) with
              avg the mean per-token log-probability of a response under the policy.

`dpo.sft_weight` adds that times the token-mean negative log-likelihood of the chosen responses (TRL's
`sft` loss term, RPO). The preference loss is the mean over the optimiser step's pairs (all
micro-batches, all processes), so it does not depend on how the step is split.

Implicit rewards (logged as `rewards/chosen`, `rewards/rejected`, their difference `rewards/margin`) are
beta times the quantity each loss compares: the summed log-ratio (sigmoid), the per-token averaged
log-ratio (dpo_norm, ipo), the per-token averaged log-probability (simpo). Preference accuracy is the
share of pairs whose chosen reward is strictly above the rejected one. Before the first update the
policy is the reference, so every margin is exactly 0 and the accuracy reads 0 (simpo excepted); the
held-out `eval_likelihood_accuracy` (chosen has the higher mean per-token log-probability under the
policy) is the policy's own preference and is meaningful from step 0.

Reference log-probabilities (`dpo.reference`): `cached` computes them once, with the starting model
before any update (adapters off with LoRA), and keeps them in the run folder (`reference_logps.json`,
checked against a fingerprint of the tokenised pairs), so training holds one model; `adapters_off`
(LoRA only) recomputes them every micro-batch with the adapters disabled, which is the same model.

Pair files (JSONL, one pair a line; also .json/.parquet files, folders of them, or a hub dataset id):
    {"prompt": "text", "chosen": "text", "rejected": "text"}
        the prompt goes through data.prompt_template and the chat template as a user turn, the responses
        are assistant turns
    {"prompt": [messages], "chosen": "text" | [assistant messages], "rejected": ...}
    {"prompt": "text"?, "chosen": [full conversation], "rejected": [full conversation]}
        UltraFeedback-binarized style: the messages the two conversations share are the prompt, the rest
        of each is its response (a `prompt` list that starts both conversations is stripped from them)
The loss covers only the response tokens (the assistant turns after the prompt, end-of-turn included).
Pairs whose response is cut away entirely by `train.max_seq_len` are dropped (counted in data_stats.json).

Phases: setup -> data -> model -> reference -> loop (forward/backward, step, log, eval, checkpoint) -> final/.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
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
from mathctl.rows import IGNORE, label_tokens

REFERENCE_FILE = "reference_logps.json"
LOSS_TYPES = ("sigmoid", "dpo_norm", "ipo", "simpo")


# --- config -----------------------------------------------------------------------------------
class DPOData(Strict):
    """Where the preference pairs come from and how rows become conversations."""

    source: str = Field(description="A JSONL pair file (what `mathctl data pairs` writes as pairs.jsonl), a "
                        ".json/.parquet file, a folder of such files, or a hub dataset id.")
    split: str = Field("train", description="Split of a hub dataset or data folder.")
    prompt_field: str = Field("prompt", description="Field holding the prompt (text or chat messages).")
    chosen_field: str = Field("chosen", description="Field holding the preferred response (text, assistant "
                              "messages, or the whole conversation).")
    rejected_field: str = Field("rejected", description="Field holding the dispreferred response.")
    prompt_template: str = Field("{prompt}", description="User turn built from a text prompt; `{prompt}` is replaced.")
    system_prompt: str | None = Field(None, description="A system message put first when the prompt has none.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of prompts held out (all their pairs) for "
                                 "held-out preference accuracy.")
    max_rows: int | None = Field(None, ge=1, description="Use only the first N pairs.")
    shuffle_seed: int = Field(42, description="Seed of the held-out split and the per-epoch order.")


class DPOSpec(Strict):
    """The preference loss."""

    loss_type: Literal["sigmoid", "dpo_norm", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO on summed log-ratios; dpo_norm: DPO on per-token averaged log-ratios "
        "(open-instruct, Tulu 3); ipo: IPO's squared loss on averaged log-ratios; simpo: SimPO, no reference.")
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward (IPO: its tau).")
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin subtracted inside the sigmoid "
                         "(open-instruct's gamma_beta_ratio times beta).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of the chosen responses' token-mean NLL added to the loss.")
    reference: Literal["cached", "adapters_off"] = Field(
        "cached", description="cached: reference log-probs computed once before training (the starting model) and "
        "kept in the run folder; adapters_off (LoRA only): computed every step with the adapters disabled.")


class DPOTrain(LMTrainBase):
    """DPO-specific training settings on top of the shared optimiser/schedule ones."""

    max_seq_len: int = Field(2048, ge=8, description="Tokens of prompt plus response; a longer response is cut at "
                             "the end (counted in data_stats.json).")
    seed: int = Field(42, description="Model init/dropout seed (and LoRA adapters').")


class DPOConfig(Strict):
    """`mathctl dpo` recipe."""

    step: Literal["dpo"] = "dpo"
    model: ModelSpec
    data: DPOData
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    train: DPOTrain = Field(default_factory=DPOTrain)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if "{prompt}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}; e.g. '{prompt}\\nShow your steps.'")
        if self.dpo.reference == "adapters_off" and not self.lora.enabled:
            raise ValueError("dpo.reference=adapters_off needs LoRA (the base model under the adapters is the "
                             "reference); set lora.enabled=true or dpo.reference=cached")
        check_lora_launch(self.lora, self.launch)
        return self

    def seeds(self) -> dict[str, int]:
        return {"train": self.train.seed, "data_shuffle": self.data.shuffle_seed}


# --- losses -----------------------------------------------------------------------------------
def uses_reference(loss_type: str) -> bool:
    return loss_type != "simpo"


def preference_loss(loss_type: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens,
                    rejected_tokens, *, beta: float, gamma: float = 0.0):
    """Per-pair losses [B] and implicit rewards (chosen [B], rejected [B]) from summed response log-probs.

    Args:
        policy_chosen, policy_rejected: the policy's log-probabilities of each response, summed over its tokens.
        ref_chosen, ref_rejected: the same under the reference (ignored by simpo; may be None there).
        chosen_tokens, rejected_tokens: each response's number of tokens (for the averaged losses).
    """
    import torch.nn.functional as F

    policy_chosen, policy_rejected = policy_chosen.float(), policy_rejected.float()
    if loss_type == "simpo":
        chosen = policy_chosen / chosen_tokens.clamp(min=1)
        rejected = policy_rejected / rejected_tokens.clamp(min=1)
        losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    else:
        chosen = policy_chosen - ref_chosen.float()  # log-ratios
        rejected = policy_rejected - ref_rejected.float()
        if loss_type in ("dpo_norm", "ipo"):
            chosen, rejected = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        if loss_type == "ipo":
            losses = (chosen - rejected - 1 / (2 * beta)) ** 2
        elif loss_type in ("sigmoid", "dpo_norm"):
            losses = -F.logsigmoid(beta * (chosen - rejected))
        else:
            raise ValueError(f"unknown dpo.loss_type {loss_type!r}; available: {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


# --- data: rows -> conversations ----------------------------------------------------------------
def _messages(value: Any, where: str, field: str) -> list[dict[str, str]] | None:
    """A list of {role, content} messages (copied to plain dicts), or None when `value` is not a list."""
    if not isinstance(value, list):
        return None
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in value):
        raise DataError(f"{where}: field '{field}' is a list but not of {{role, content}} messages with text content",
                        hint="give text, or a list of {\"role\": ..., \"content\": \"...\"} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def row_to_conversation(row: dict[str, Any], data: DPOData, where: str
                        ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt messages, chosen response messages, rejected response messages) of one pair row."""
    hint = (f"a pair is {{{data.prompt_field}, {data.chosen_field}, {data.rejected_field}}}: text, or chat messages "
            "(see `mathctl dpo --help` and docs/dpo.md)")
    for field in (data.chosen_field, data.rejected_field):
        if field not in row:
            raise DataError(f"{where}: no field '{field}' (fields: {', '.join(sorted(row)) or 'none'})", hint=hint)
    prompt_value = row.get(data.prompt_field)
    sides = []
    for field in (data.chosen_field, data.rejected_field):
        value = row[field]
        listed = _messages(value, where, field)
        if listed is None:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field '{field}' must be non-empty text or a list of messages", hint=hint)
            listed = [{"role": "assistant", "content": value}]
            sides.append((listed, False))
        else:
            sides.append((listed, True))
    prompt = _messages(prompt_value, where, data.prompt_field)
    (chosen, chosen_full), (rejected, rejected_full) = sides
    if prompt is not None:  # a prompt list that also starts the conversations is stripped from them
        if chosen_full and chosen[:len(prompt)] == prompt:
            chosen = chosen[len(prompt):]
        if rejected_full and rejected[:len(prompt)] == prompt:
            rejected = rejected[len(prompt):]
    elif chosen_full and rejected_full:  # full conversations: the shared messages are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt:
        if not isinstance(prompt_value, str) or not prompt_value.strip():
            raise DataError(f"{where}: no prompt: field '{data.prompt_field}' is missing or empty and the responses "
                            "do not start with one", hint=hint)
        prompt = [{"role": "user", "content": data.prompt_template.replace("{prompt}", prompt_value)}]
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response or response[0]["role"] != "assistant":
            raise DataError(f"{where}: the {name} response must start with an assistant message after the prompt",
                            hint=hint)
    if data.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": data.system_prompt}] + prompt
    return prompt, chosen, rejected


def load_pair_rows(data: DPOData) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) of every pair: JSONL lines are named by file and line, other sources by row."""
    from mathctl.core.io import iter_jsonl
    from mathctl.rows import load_rows

    path = Path(data.source).expanduser()
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.suffix == ".jsonl" else []
    out: list[tuple[str, dict[str, Any]]] = []
    if files:
        for file in files:
            for number, row in iter_jsonl(file):
                out.append((f"{file} line {number}", row))
                if data.max_rows and len(out) >= data.max_rows:
                    return out
    else:
        rows = load_rows(data.source, split=data.split)
        out = [(f"{data.source} row {i + 1}", row) for i, row in enumerate(rows)]
    if not out:
        raise DataError(f"pair source {data.source} has no rows", hint="check data.source")
    return out[: data.max_rows] if data.max_rows else out


def encode_pairs(rows: list[tuple[str, dict[str, Any]]], data: DPOData, tokenizer, max_len: int
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Token ids and labels (IGNORE outside the response) of both sides of every pair, plus counts."""
    render = tokenizer.apply_chat_template
    texts, spans, groups = [], [], []
    for where, row in rows:
        prompt, chosen, rejected = row_to_conversation(row, data, where)
        head = render(prompt, tokenize=False, add_generation_prompt=True)
        for response in (chosen, rejected):
            full = render(prompt + response, tokenize=False)
            if not full.startswith(head):
                raise DataError(f"{where}: the chat template does not render the conversation prefix by prefix, so "
                                "the response tokens cannot be told from the prompt's",
                                hint="choose another model.chat_template (chatml, tulu, llama3, rstar, plain)")
            texts.append(full)
            spans.append((len(head), len(full)))
        groups.append(head)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:  # straight to the Rust tokenizer: only ids and offsets become Python objects
        encoded = [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        encoded = list(zip(enc["input_ids"], enc["offset_mapping"]))
    stats = {"rows": len(rows), "truncated_responses": 0, "dropped_no_response_tokens": 0, "dropped_identical": 0}
    pairs = []
    for k, group in enumerate(groups):
        sides = [label_tokens(ids, offsets, [span], "assistant", max_len)
                 for (ids, offsets), span in zip(encoded[2 * k:2 * k + 2], spans[2 * k:2 * k + 2])]
        stats["truncated_responses"] += sum(s["truncated"] for s in sides)
        counts = [sum(1 for t in s["labels"][1:] if t != IGNORE) for s in sides]
        if min(counts) == 0:
            stats["dropped_no_response_tokens"] += 1
            continue
        if sides[0]["input_ids"] == sides[1]["input_ids"]:
            stats["dropped_identical"] += 1  # nothing to prefer: the loss is log 2 whatever the model does
            continue
        pairs.append({"id": len(pairs), "group": group, "chosen": sides[0]["input_ids"], "chosen_labels": sides[0]["labels"],
                      "rejected": sides[1]["input_ids"], "rejected_labels": sides[1]["labels"],
                      "chosen_tokens": counts[0], "rejected_tokens": counts[1]})
    stats["pairs"] = len(pairs)
    if not pairs:
        raise DataError(f"no pair of {data.source} has response tokens to train on",
                        hint="raise train.max_seq_len or check the data")
    return pairs, stats


def split_pairs(pairs: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (all their pairs), so held-out accuracy is measured on unseen prompts."""
    groups = sorted({p["group"] for p in pairs})
    random.Random(seed).shuffle(groups)
    held = set(groups[: int(round(len(groups) * fraction))]) if fraction > 0 else set()
    return [p for p in pairs if p["group"] not in held], [p for p in pairs if p["group"] in held]


def fingerprint(pairs: list[dict[str, Any]], model_path: str) -> str:
    """What the cached reference log-probs depend on: the starting model and every tokenised, labelled pair."""
    digest = hashlib.sha256(model_path.encode())
    for p in pairs:
        digest.update(json.dumps([p["chosen"], p["chosen_labels"], p["rejected"], p["rejected_labels"]]).encode())
    return digest.hexdigest()[:16]


# --- batches and log-probabilities --------------------------------------------------------------
def collate_pairs(pairs: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """The chosen rows then the rejected rows of a micro-batch, right-padded: [2B, T]. Targets are the next
    token where it is a response token, IGNORE elsewhere (the prompt and the padding carry no loss)."""
    import torch

    rows = [(p["chosen"], p["chosen_labels"]) for p in pairs] + [(p["rejected"], p["rejected_labels"]) for p in pairs]
    width = max(len(ids) for ids, _ in rows)
    ids = [list(i) + [pad_id] * (width - len(i)) for i, _ in rows]
    targets = [list(labels[1:]) + [IGNORE] * (width - len(labels) + 1) for _, labels in rows]
    mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "targets": torch.tensor(targets)}


def pair_logprobs(model, batch: dict[str, Any], device, chunk_tokens: int | None):
    """Summed response log-probabilities of the micro-batch's chosen [B] and rejected [B] rows, in one forward."""
    from mathctl import losses

    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    sums = losses.target_logprobs(model, inputs, batch["targets"].to(device), chunk_tokens=chunk_tokens)  # [2B]
    half = sums.shape[0] // 2
    return sums[:half], sums[half:]


# --- run ----------------------------------------------------------------------------------------
def run(cfg: DPOConfig, run_dir: RunDir) -> dict[str, Any]:
    """Train as the recipe says; returns the run summary (also written to summary.json)."""
    import contextlib

    import torch

    from mathctl import models, training
    from mathctl.core.io import atomic_write_json, atomic_write_text

    d = cfg.dpo
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
    pairs, stats = encode_pairs(load_pair_rows(cfg.data), cfg.data, tokenizer, cfg.train.max_seq_len)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.shuffle_seed)
    if not train_pairs:
        raise DataError(f"every pair of {cfg.data.source} is held out", hint="lower data.eval_fraction")
    plan = training.StepPlan(len(train_pairs), cfg.train, dist.world, cfg.data.shuffle_seed)
    stats.update(train_pairs=len(train_pairs), eval_pairs=len(eval_pairs), prompts=len({p["group"] for p in pairs}),
                 eval_prompts=len({p["group"] for p in eval_pairs}))
    if dist.is_main:
        atomic_write_json(run_dir.path / "data_stats.json", stats)
    log(f"data: {len(train_pairs)} train pairs, {len(eval_pairs)} held out ({stats['eval_prompts']} of "
        f"{stats['prompts']} prompts); {plan.total_steps} steps of {plan.global_batch} pairs")

    # --- model
    def build(empty: bool):
        return models.load_causal_lm(cfg.model, device_type=dist.device.type, compute=cfg.train.precision, empty=empty)

    model = training.prepare_model(build, cfg.model, cfg.train, cfg.lora, cfg.launch, dist)
    model.train()
    optimizer = training.build_optimizer(model, cfg.train)
    scheduler = training.build_scheduler(optimizer, cfg.train, plan.total_steps)
    needs_ref = uses_reference(d.loss_type)
    on_the_fly = needs_ref and d.reference == "adapters_off"
    log(f"model: {cfg.model.path}, trainable parameters {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
        f"on {dist.world} process(es); loss {d.loss_type} (beta {d.beta}); reference: "
        + ("none (simpo)" if not needs_ref else "adapters off, every step" if on_the_fly else f"cached in {REFERENCE_FILE}"))

    def reference_context():
        """The reference model: the policy with its adapters switched off (LoRA), else the policy as it is."""
        return training.unwrap(model).disable_adapter() if cfg.lora.enabled else contextlib.nullcontext()

    def logprobs(chunk: list[dict[str, Any]], *, reference: bool = False, grad: bool = False):
        batch = collate_pairs(chunk, tokenizer.pad_token_id)
        with torch.set_grad_enabled(grad), training.autocast(cfg.train, dist, model), \
                (reference_context() if reference else contextlib.nullcontext()):
            return pair_logprobs(model, batch, dist.device, cfg.train.logits_chunk_tokens)

    def compute_reference(items: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
        """Reference log-probs of `items` by pair id, in the micro-batches evaluation uses (held_out_share):
        at step 0 the held-out policy log-probs then equal these bit for bit, and every margin is exactly 0."""
        if not items:
            return {}
        values = torch.zeros(len(items), 2, dtype=torch.float64)
        position = {p["id"]: k for k, p in enumerate(items)}
        model.eval()
        for chunk, weights in training.held_out_share(items, dist, cfg.train.micro_batch_size):
            c, r = logprobs(chunk, reference=True)
            for p, w, cv, rv in zip(chunk, weights, c.tolist(), r.tolist()):
                if w:  # not a padding copy
                    values[position[p["id"]]] = torch.tensor([cv, rv], dtype=torch.float64)
        model.train()
        flat = dist.all_reduce_sum(values.flatten().tolist())  # each pair was filled on exactly one process
        return {p["id"]: (flat[2 * k], flat[2 * k + 1]) for k, p in enumerate(items)}

    # --- reference log-probs: computed before any checkpoint is loaded, so they are the starting model's
    cache: dict[int, tuple[float, float]] = {}
    if needs_ref and not on_the_fly:
        path = run_dir.path / REFERENCE_FILE
        key = fingerprint(pairs, cfg.model.path)
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and saved.get("fingerprint") == key:
            cache = {int(k): tuple(v) for k, v in saved["logps"].items()}
            log(f"reference log-probs: {len(cache)} pairs from {path.name}")
        else:
            if saved is not None:
                log(f"{path.name} was computed for other pairs or another model: computing it again")
            began = time.perf_counter()
            cache = {**compute_reference(train_pairs), **compute_reference(eval_pairs)}
            if dist.is_main:
                atomic_write_json(path, {"fingerprint": key, "model": cfg.model.path, "pairs": len(cache),
                                         "logps": {str(k): list(v) for k, v in sorted(cache.items())}})
            log(f"reference log-probs of {len(cache)} pairs computed in {time.perf_counter() - began:.1f} s")

    def reference_of(chunk: list[dict[str, Any]]):
        if not needs_ref:
            return None, None
        if on_the_fly:
            was_training = model.training
            model.eval()
            c, r = logprobs(chunk, reference=True)
            model.train(was_training)
            return c, r
        values = torch.tensor([cache[p["id"]] for p in chunk], dtype=torch.float32, device=dist.device)  # [B, 2]
        return values[:, 0], values[:, 1]

    def pair_losses(chunk: list[dict[str, Any]], c, r, ref):
        ref_c, ref_r = ref
        counts = torch.tensor([[p["chosen_tokens"], p["rejected_tokens"]] for p in chunk], dtype=torch.float32,
                              device=c.device)
        return preference_loss(d.loss_type, c, r, ref_c, ref_r, counts[:, 0], counts[:, 1], beta=d.beta, gamma=d.gamma)

    # --- resume
    start_step = 0
    latest = run_dir.latest_checkpoint()
    if latest is not None:
        moved = training.check_resume(latest, dist, plan.facts(), hint=plan.resume_hint())
        state = training.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist)
        start_step = state["step"]
        if moved and dist.is_main:
            run_dir.update_meta(resumed_on_other_world=moved)
        log(f"resumed from {latest.name}: continuing at step {start_step}")
    if dist.is_main:
        run_dir.truncate_metrics(start_step)

    def save(step: int) -> None:
        training.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 trainer_state={"epoch": plan.epoch_of(step), **plan.facts()}, dist=dist,
                                 keep_last=cfg.output.keep_last_checkpoints, hf=cfg.output.save_hf_checkpoints,
                                 tokenizer=tokenizer, lora=cfg.lora, chat_template=chat_template)

    def evaluate() -> dict[str, float] | None:
        if not eval_pairs:
            return None
        model.eval()
        totals = [0.0] * 5  # loss, correct, margin, likelihood-correct, pairs
        for chunk, weights in training.held_out_share(eval_pairs, dist, cfg.train.micro_batch_size):
            ref = reference_of(chunk)
            c, r = logprobs(chunk)
            with torch.no_grad():
                losses_, rc, rr = pair_losses(chunk, c, r, ref)
            w = torch.tensor(weights, device=c.device)  # 0 for padding copies
            counts = torch.tensor([[p["chosen_tokens"], p["rejected_tokens"]] for p in chunk], device=c.device)
            likelier = (c / counts[:, 0] > r / counts[:, 1]).float()
            for k, value in enumerate((losses_, (rc > rr).float(), rc - rr, likelier, torch.ones_like(w))):
                totals[k] += float((value.float() * w).sum())
        loss_sum, correct, margin, likelier_sum, count = dist.all_reduce_sum(totals)
        model.train()
        count = max(count, 1.0)
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count, "eval_margin": margin / count,
                "eval_likelihood_accuracy": likelier_sum / count}

    # --- loop
    last: dict[str, Any] = {}
    last_eval: dict[str, float] | None = None
    start_eval: dict[str, float] | None = None
    if start_step == 0:
        start_eval = evaluate()  # the starting model: the first point of the held-out curves
        if start_eval is not None and dist.is_main:
            run_dir.log_metrics({"step": 0, **start_eval})
            log(f"step 0 held-out likelihood accuracy {start_eval['eval_likelihood_accuracy']:.3f}")
    started = time.perf_counter()
    chosen_tokens = [p["chosen_tokens"] for p in train_pairs]
    with progress("dpo", plan.total_steps) as advance:
        advance(start_step)
        for step in range(start_step, plan.total_steps):
            global_indices = plan.step_indices(step)
            num_pairs = len(global_indices)
            global_chosen_tokens = sum(chosen_tokens[i] for i in global_indices)  # the sft term's token mean
            sums = [0.0] * 6  # loss, preference loss, sft nll, reward chosen, reward rejected, correct
            micro = plan.micro_batches(step, dist.rank)
            for j, indices in enumerate(micro):
                chunk = [train_pairs[i] for i in indices]
                ref = reference_of(chunk)  # adapters_off: a no-grad forward before the policy's, as grpo does
                with training.grad_sync(model, cfg.train, last=j == len(micro) - 1):
                    c, r = logprobs(chunk, grad=True)
                    per_pair, rc, rr = pair_losses(chunk, c, r, ref)
                    preference = per_pair.sum() / num_pairs
                    nll = -c.float().sum() / global_chosen_tokens
                    loss = preference + d.sft_weight * nll if d.sft_weight else preference
                    (loss * dist.world).backward()  # FSDP/DDP average over processes; the loss is already global
                sums[0] += float(loss.detach())
                sums[1] += float(preference.detach())
                sums[2] += float(nll.detach())
                sums[3] += float(rc.sum())
                sums[4] += float(rr.sum())
                sums[5] += float((rc > rr).sum())
            grad_norm = training.clip_grad_norm(model, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            loss_, pref, nll_, reward_c, reward_r, correct = dist.all_reduce_sum(sums)
            last = {"loss": loss_, "preference_loss": pref, "rewards/chosen": reward_c / num_pairs,
                    "rewards/rejected": reward_r / num_pairs, "rewards/margin": (reward_c - reward_r) / num_pairs,
                    "accuracy": correct / num_pairs}
            if d.sft_weight:
                last["sft_nll"] = nll_
            record: dict[str, Any] | None = None
            if done % cfg.train.log_every_steps == 0 or done == plan.total_steps:
                record = {"step": done, "epoch": round(plan.epoch_of(done), 4), **last, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "elapsed_s": time.perf_counter() - started}
            if (cfg.train.eval_every_steps and done % cfg.train.eval_every_steps == 0) or done == plan.total_steps:
                last_eval = evaluate()
                if last_eval is not None:
                    record = (record or {"step": done}) | last_eval
            if record is not None and dist.is_main:
                run_dir.log_metrics(record)
                if not console.is_terminal:  # no live bar (CI, Slurm logs): one line per logged step
                    extra = f" eval_accuracy {record['eval_accuracy']:.3f}" if "eval_accuracy" in record else ""
                    log(f"step {done}/{plan.total_steps} loss {last['loss']:.4f} margin {last['rewards/margin']:.4f} "
                        f"accuracy {last['accuracy']:.3f}{extra}")
            advance(1, loss=f"{last['loss']:.4f}")
            if cfg.output.save_every_steps and done % cfg.output.save_every_steps == 0 and done != plan.total_steps:
                save(done)
    train_seconds = time.perf_counter() - started

    # --- final
    if start_step < plan.total_steps or run_dir.latest_checkpoint() is None:
        save(plan.total_steps)
    training.save_hf(model, tokenizer, run_dir.final_dir, dist, lora=cfg.lora, chat_template=chat_template)
    summary: dict[str, Any] = {
        "status": "completed", "run_dir": str(run_dir.path), "final_dir": str(run_dir.final_dir),
        "loss_type": d.loss_type, "beta": d.beta, "reference": d.reference if needs_ref else None,
        "steps": plan.total_steps, "resumed_from_step": start_step, "train_loss": last.get("loss"),
        "train_accuracy": last.get("accuracy"), "train_margin": last.get("rewards/margin"), **(last_eval or {}),
        **({f"{k}_start": v for k, v in start_eval.items()} if start_eval else {}),
        "train_seconds": round(train_seconds, 3), "world_size": dist.world, "data": stats,
    }
    if dist.is_main:
        if cfg.output.plots:
            metrics = run_dir.read_metrics()
            title = f"mathctl dpo ({d.loss_type}): {run_dir.path.name}"
            training.plot_curves(metrics, [("loss", "train loss"), ("eval_loss", "held-out loss")],
                                 run_dir.plots_dir / "loss.png", title)
            training.plot_curves(metrics, [("rewards/margin", "train reward margin"),
                                           ("eval_margin", "held-out reward margin")],
                                 run_dir.plots_dir / "margin.png", "implicit reward margin (chosen - rejected)", "margin")
            training.plot_curves(metrics, [("accuracy", "train preference accuracy"),
                                           ("eval_accuracy", "held-out preference accuracy"),
                                           ("eval_likelihood_accuracy", "held-out likelihood accuracy")],
                                 run_dir.plots_dir / "accuracy.png", "preference accuracy", "accuracy")
        run_dir.finish("completed", summary)
    training.close_distributed(dist)
    return summary
