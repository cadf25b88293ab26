"""mathctl/losses.py: the chunked LM head gives the full-logits values and gradients (fp32, within 1e-5) in
sft's loss and grpo's log-probabilities and entropy, with chunks that do not divide the positions."""

from __future__ import annotations

import pytest
import torch

from mathctl import losses
from mathctl.grpo import build_batch, completion_logprobs
from mathctl.sft import IGNORE, collate, count_targets, token_nll_sum, tokenize_conversation


@pytest.fixture(scope="module")
def model(lively_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lively_model, dtype=torch.float32)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_sft_loss_and_gradients_match_full_logits(model, tokenizer, chunk):
    convs = [[{"role": "user", "content": f"Sam has {n} coins. How many?" + " More." * n},
              {"role": "assistant", "content": f"Sam has {n} coins. The answer is \\boxed{{{n}}}."}] for n in (1, 7, 3)]
    from mathctl.models import CHAT_TEMPLATES

    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    examples = [tokenize_conversation(c, tokenizer, "assistant", 512) for c in convs]
    batch = collate(examples, packing=False, pad_id=tokenizer.pad_token_id, attn_implementation="sdpa",
                    row_capacity=512)
    values, grads = [], []
    for chunk_tokens in (None, chunk):
        model.zero_grad()
        loss = token_nll_sum(model, batch, torch.device("cpu"), chunk_tokens) / count_targets(examples)
        loss.backward()
        values.append(float(loss))
        grads.append(_grads(model))
    assert values[0] == pytest.approx(values[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert losses.output_head(model).forward.__func__ is type(losses.output_head(model)).forward  # restored


@pytest.mark.parametrize("chunk", [2, 5])
def test_grpo_logprobs_entropy_and_gradients_match_full_logits(model, chunk):
    items = [{"prompt_ids": [5, 6, 7, 8, 9], "completion_ids": [10, 11, 12]},
             {"prompt_ids": [13, 14], "completion_ids": [15, 16, 17, 18, 19]},
             {"prompt_ids": [20, 21, 22], "completion_ids": [23]}]
    batch = build_batch(items, pad_id=0, device=torch.device("cpu"))
    results = []
    for chunk_tokens in (None, chunk):
        model.zero_grad()
        logps, ent = completion_logprobs(model, batch, temperature=0.7, entropy=True, chunk_tokens=chunk_tokens)
        (logps * batch["completion_mask"]).sum().backward()
        results.append((logps.detach(), ent, _grads(model)))
    (full, full_ent, full_grad), (chunked, chunked_ent, chunked_grad) = results
    assert torch.allclose(full, chunked, atol=1e-5) and torch.allclose(full_ent, chunked_ent, atol=1e-5)
    assert torch.allclose(full_grad, chunked_grad, atol=1e-5)
    with torch.no_grad():
        _, none = completion_logprobs(model, batch, temperature=0.7, entropy=False, chunk_tokens=chunk)
    assert none is None


def test_token_logprobs_ignores_and_shapes():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    weight = torch.randn(11, 8)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = IGNORE
    logp, ent = losses.token_logprobs(hidden, weight, None, targets, chunk_tokens=3, entropy=True)
    full = torch.log_softmax(hidden @ weight.T, -1)
    want = full.gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == IGNORE, 0)
    assert logp.shape == (2, 5) and torch.allclose(logp, want, atol=1e-6)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-5)


def test_models_that_change_logits_after_the_head_take_the_plain_path(model):
    assert losses.chunked_head_supported(model)
    model.config.final_logit_softcapping = 30.0
    try:
        assert not losses.chunked_head_supported(model)
    finally:
        model.config.final_logit_softcapping = None


def test_bf16_autocast_matches_the_plain_path(model):
    """Under bf16 autocast (train.precision=bf16 on one process) backward recomputes under the same autocast
    state: values and gradients agree with the full-logits path to bf16 precision."""
    items = [{"prompt_ids": [5, 6, 7], "completion_ids": [10, 11, 12, 13]}, {"prompt_ids": [8], "completion_ids": [9]}]
    batch = build_batch(items, pad_id=0, device=torch.device("cpu"))
    results = []
    for chunk_tokens in (None, 3):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = completion_logprobs(model, batch, temperature=1.0, chunk_tokens=chunk_tokens)
        (logps * batch["completion_mask"]).sum().backward()
        results.append((logps.detach(), _grads(model)))
    assert torch.allclose(results[0][0], results[1][0], atol=2e-2)
    assert torch.allclose(results[0][1], results[1][1], atol=5e-2, rtol=5e-2)
