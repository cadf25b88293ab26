"""Rollout plumbing: the prompts and their seeded order, dynamic sampling's draws, the weights pushed to the engine,
and padded batches with their completion log-probabilities."""

from __future__ import annotations

import random
from typing import Any

from mathctl.core.config import (
    LoraSpec,
)
from mathctl.core.errors import DataError
from mathctl.grpo.config import GRPOData

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
