"""Per-token log-probabilities (and entropies) through the LM head a chunk of tokens at a time.

A trainer's forward used to return `[tokens x vocab]` logits and take the log-softmax of all of them in fp32:
with Qwen2.5's 151,936-token vocabulary that is 0.6 MB per token, times three or four live copies (logits, the
fp32 upcast, log-softmax, their gradients), before the model's own activations. Here the LM head's forward is
replaced, for the length of one trainer forward, by a function that takes the final hidden states and returns
log p(target) per position: the logits of `chunk_tokens` positions exist at a time, nothing of that size is
kept for backward, and backward recomputes each chunk's logits and turns them into their gradient in place
(a custom autograd function), so the peak is about two `[chunk x vocab]` fp32 buffers.

The swap happens inside the model's own forward (`model(...)` is still what the trainer calls), so FSDP2,
DDP, peft and `logits_to_keep` behave as before; the state dict is untouched. Models whose forward changes
the logits after the head (Gemma's soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`) are
detected and take the plain path (`chunked_head_supported`).

    with head_logprobs(model, targets, temperature=1.0, chunk_tokens=1024) as result:
        model(input_ids=..., logits_to_keep=...)        # the head sees [B, K, H], targets are [B, K]
    result.logprobs, result.entropy                      # [B, K] fp32; IGNORE targets give 0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mathctl.rows import IGNORE

_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head (`get_output_embeddings()`) through DDP and peft wrappers; FSDP2 keeps the class."""
    inner = model
    while True:
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif type(inner).__name__ == "DistributedDataParallel":
            inner = inner.module
        else:
            break
    getter = getattr(inner, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def chunked_head_supported(model: torch.nn.Module) -> bool:
    """A linear LM head whose output the model's forward returns unchanged."""
    head = output_head(model)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        return False
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):  # an adapter on the head: its weight is not all
        return False
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    for key in _AFTER_HEAD:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0) and not isinstance(value, bool):
            return False
    return True


@dataclass
class HeadResult:
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
                   temperature: float = 1.0, chunk_tokens: int = 1024,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T + bias) / temperature at `targets`, in fp32, `chunk_tokens` positions at a
    time; positions whose target is IGNORE give 0. `entropy`: also the entropy of each position's distribution
    (no gradient). Shapes: hidden [..., H], targets [...]. Backward recomputes each chunk's logits and turns
    them into their gradient in place, so a chunk costs about two [chunk x vocab] fp32 buffers."""
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(flat_hidden.device)
    logps, ents = [], []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        lp, ent = _ChunkLogp.apply(flat_hidden[start:start + chunk_tokens], weight, bias,
                                   flat_targets[start:start + chunk_tokens], temperature, entropy)
        logps.append(lp)
        if entropy:
            ents.append(ent)
    logp = torch.cat(logps).reshape(shape) if logps else flat_hidden.new_zeros(shape, dtype=torch.float32)
    ent = (torch.cat(ents).reshape(shape) if ents else logp.detach().clone()) if entropy else None
    return logp, ent


class _ChunkLogp(torch.autograd.Function):
    """One chunk: log p(target) (and optionally the entropy) from hidden states and the head's weight. Nothing
    of size [chunk x vocab] is kept for backward: backward recomputes the logits under the forward's autocast
    state, and d logp / d logits = onehot(target) - softmax is formed in that same buffer."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, entropy: bool):  # noqa: ANN001
        device = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(device)
        ctx.dtype = torch.get_autocast_dtype(device) if ctx.autocast else None
        ctx.temperature = temperature
        ignored = targets == IGNORE
        safe = targets.masked_fill(ignored, 0)
        with torch.no_grad():
            logits = _logits(hidden, weight, bias, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            logp = (logits.gather(-1, safe[:, None])[:, 0] - lse).masked_fill(ignored, 0.0)
            ent = None
            if entropy:
                ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, safe, ignored, lse)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):  # noqa: ANN001
        hidden, weight, bias, safe, ignored, lse = ctx.saved_tensors
        device = hidden.device.type
        g = grad_logp.float().masked_fill(ignored, 0.0)
        with torch.no_grad(), torch.autocast(device, dtype=ctx.dtype or torch.bfloat16, enabled=ctx.autocast):
            grad = _logits(hidden, weight, bias, ctx.temperature)       # the logits again ...
            grad.sub_(lse[:, None]).exp_().mul_(-g[:, None])           # ... -softmax * g, in place
            grad.scatter_add_(-1, safe[:, None], g[:, None])           # + onehot(target) * g
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            compute = hidden.dtype if not ctx.autocast else ctx.dtype
            grad = grad.to(compute)
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad @ weight.to(compute)).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad.t() @ hidden.to(compute)).to(weight.dtype)
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _logits(hidden, weight, bias, temperature: float):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _from_logits(logits, targets, temperature: float, entropy: bool):
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    ignored = targets == IGNORE
    picked = logits.gather(-1, targets.masked_fill(ignored, 0)[:, None])[:, 0]
    logp = (picked - lse).masked_fill(ignored, 0.0)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


@contextmanager
def head_logprobs(model: torch.nn.Module, targets: torch.Tensor, *, temperature: float = 1.0,
                  chunk_tokens: int = 1024, entropy: bool = False, drop_last: bool = False) -> Iterator[HeadResult]:
    """For the forwards inside the block, the LM head returns log p(targets) per position (also what
    `.logits` of the output is) instead of logits; the last one is kept in the yielded HeadResult.
    `drop_last`: the head's last position has no target (GRPO keeps C + 1 positions to predict C tokens)."""
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to chunk")
    result = HeadResult()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if drop_last:
            hidden = hidden[:, :-1]
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"the LM head saw positions of shape {tuple(hidden.shape[:-1])}, the targets are "
                             f"{tuple(targets.shape)}")
        result.logprobs, result.entropy = token_logprobs(
            hidden, head.weight, getattr(head, "bias", None), targets, temperature=temperature,
            chunk_tokens=chunk_tokens, entropy=entropy)
        return result.logprobs

    head.forward = forward  # an instance attribute: hooks (FSDP2, peft) still run through __call__
    try:
        yield result
    finally:
        del head.forward


def plain_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same values from full logits [..., V] (models whose forward changes the logits after the head)."""
    shape = targets.shape
    logp, ent = _from_logits(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), temperature, entropy)
    return logp.reshape(shape), None if ent is None else ent.reshape(shape)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (peft and DDP wrappers peeled; FSDP2 keeps the class)."""
    import inspect

    inner = model
    while True:
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif type(inner).__name__ == "DistributedDataParallel":
            inner = inner.module
        else:
            break
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def target_logprobs(model: torch.nn.Module, inputs: dict, targets: torch.Tensor, *,
                    chunk_tokens: int | None = 1024) -> torch.Tensor:
    """log p(target) at every position of `targets` [B, T] (IGNORE positions give 0), summed per row: [B] fp32.

    Only positions that have a target in some row go through the LM head (`logits_to_keep`), and with
    `chunk_tokens` the head works that many positions at a time, so no [T, V] fp32 logits are held; a
    model whose forward changes its logits after the head (or lacks `logits_to_keep`) takes the plain path.
    `inputs` are the model's other arguments (input_ids, attention_mask, ...)."""
    inputs = dict(inputs)
    if accepts_logits_to_keep(model):
        keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)  # [K] positions with a target in any row
        inputs["logits_to_keep"] = keep
        targets = targets[:, keep]
    if chunk_tokens and chunked_head_supported(model):
        with head_logprobs(model, targets, chunk_tokens=chunk_tokens) as head:
            model(**inputs, use_cache=False)
        return head.logprobs.sum(-1)
    logits = model(**inputs, use_cache=False).logits  # [B, K, V]
    logp, _ = plain_logprobs(logits, targets)
    return logp.sum(-1)
