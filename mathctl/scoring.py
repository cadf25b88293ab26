"""A trained reward model at inference (outcome RM or rStar-style process preference model), and the
pieces its training shares: how a question is rendered before the first step, where a step's score is
read, the scalar head and the forward that reads it at many positions.

Used by `rm` (training), `mcts-sample` (value prior, terminal values, beam scores) and `eval`
(best-of-n with `--prm`), so it lives below the steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mathctl.core.config import ModelSpec
from mathctl.core.errors import ConfigError

RM_META = "mathctl_rm.json"


def render_prompt(tokenizer, question: str, template: str) -> str:
    """The question as the model sees it before the first step: the chat template's user turn and
    assistant header."""
    content = template.replace("{prompt}", question)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def score_head(model):
    """The scalar head module (`score` on decoder models), through peft and DDP wrappers."""
    inner = model.module if type(model).__name__ == "DistributedDataParallel" else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    if head is None:
        raise ConfigError(f"{type(inner).__name__} has no `score` head", hint="use a decoder-only causal LM as the base")
    return head


class _Capture:
    """Keeps the head's output for every position (the model's own output pools one position)."""

    def __init__(self, model):
        self.values = None
        self.handle = score_head(model).register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):  # noqa: ANN001
        self.values = output

    def close(self) -> None:
        self.handle.remove()


def _pad(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def forward_scores(model, capture: _Capture, seqs: list[list[int]], positions: list[list[int]], pad_id: int, device):
    """Head values at `positions[i]` of sequence i (right-padded batch, one forward pass)."""
    import torch

    ids, mask = _pad(seqs, pad_id)
    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    values = capture.values[..., 0]  # [B, T]
    rows = torch.tensor([i for i, pos in enumerate(positions) for _ in pos], device=values.device)
    cols = torch.tensor([p for pos in positions for p in pos], device=values.device)
    return values[rows, cols].float()


# --- scoring API ----------------------------------------------------------------------------------


class RewardScorer:
    """Batched scoring with a trained reward model, for search (per-step PPM values) and best-of-N.

    `score(prompt, steps)` -> one value per step; `score_outcome(prompt, response)` -> one value.
    Prompts are questions: they are rendered with the model's chat template and its recorded
    prompt template, as in training (`raw_prompt=True` takes them as the full text already).
    """

    def __init__(self, model, tokenizer, *, prompt_template: str = "{prompt}", device=None, batch_size: int = 16,
                 max_len: int | None = None):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = prompt_template
        self.device = device or next(model.parameters()).device
        self.batch_size = batch_size
        self.max_len = max_len
        self.capture = _Capture(model)
        self._torch = torch

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | None = None, dtype=None, batch_size: int = 16,
                        trust_remote_code: bool = False) -> RewardScorer:
        import torch
        from transformers import AutoModelForSequenceClassification

        from mathctl import models

        folder = models.resolve_model_path(path)
        meta_path = Path(folder) / RM_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        tokenizer = models.load_tokenizer(ModelSpec(path=folder, trust_remote_code=trust_remote_code))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype,
                                                                       trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load reward model {folder}: {str(exc).splitlines()[0]}",
                              hint="give the final/ folder of a `mathctl rm` run") from None
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.to(device), tokenizer, prompt_template=meta.get("prompt_template", "{prompt}"),
                   device=torch.device(device), batch_size=batch_size)

    def _head(self, prompt: str, raw_prompt: bool) -> str:
        return prompt if raw_prompt else render_prompt(self.tokenizer, prompt, self.template)

    def encode(self, prompt: str, steps: list[str], *, raw_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a trajectory and the positions its steps' scores are read at. A prompt rendered
        here, or given as a `ChatText`, is tokenised as its template wrote it (as in training); a raw
        text prompt as the policy's engine tokenised it (with the tokenizer's BOS, one at most)."""
        from mathctl.engines import ChatText, adds_special_tokens

        head = self._head(prompt, raw_prompt)
        text = head + "".join(steps)
        add = raw_prompt and not isinstance(prompt, ChatText) and adds_special_tokens(self.tokenizer, head)
        enc = self.tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
        ends, pos = [], len(head)
        for step in steps:
            ends.append(pos + score_end(step))
            pos += len(step)
        return enc["input_ids"], _positions_for_ends(enc["offset_mapping"], ends)

    def score_many(self, items: list[tuple[str, list[str]]], *, raw_prompt: bool = False) -> list[list[float]]:
        """Per-step values of many (prompt, steps) trajectories (tokenised by `encode`)."""
        encoded = [self.encode(prompt, steps, raw_prompt=raw_prompt) for prompt, steps in items]
        out: list[list[float]] = [[] for _ in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i][0]))
        with self._torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = [i for i in order[start:start + self.batch_size] if encoded[i][1]]
                if not chunk:
                    continue
                values = forward_scores(self.model, self.capture, [encoded[i][0] for i in chunk],
                                        [encoded[i][1] for i in chunk], self.tokenizer.pad_token_id, self.device)
                flat = iter(values.tolist())
                for i in chunk:
                    out[i] = [next(flat) for _ in encoded[i][1]]
        return out

    def score(self, prompt: str, steps: list[str], *, raw_prompt: bool = False) -> list[float]:
        return self.score_many([(prompt, steps)], raw_prompt=raw_prompt)[0]

    def score_outcomes(self, items: list[tuple[str, str]], *, raw_prompt: bool = False) -> list[float]:
        return [s[-1] if s else float("nan") for s in self.score_many([(p, [r]) for p, r in items], raw_prompt=raw_prompt)]

    def score_outcome(self, prompt: str, response: str, *, raw_prompt: bool = False) -> float:
        return self.score_outcomes([(prompt, response)], raw_prompt=raw_prompt)[0]

    def close(self) -> None:
        self.capture.close()


def score_end(step: str) -> int:
    """Where a step's score is read, as a character offset into the step: after its last
    non-whitespace character, so a newline that delimits steps is not the token the score sits on
    (rStar's steps end in a marker such as `<end_of_step>`, read at the marker's last token)."""
    stripped = len(step.rstrip())
    return stripped if stripped else len(step)


def _positions_for_ends(offsets: list[tuple[int, int]], ends: list[int]) -> list[int]:
    """For each step end (a character position), the last token that ends within the step."""
    positions = []
    k = 0
    for end in ends:
        while k + 1 < len(offsets) and offsets[k + 1][1] <= end:
            k += 1
        if offsets and offsets[k][1] <= end:
            positions.append(k)
        else:
            positions.append(max(k - 1, 0))
    return positions


def split_steps(text: str, delimiters: tuple[str, ...] = ("<end_of_step>", "<end_of_code>", "<end_of_answer>")) -> list[str]:
    """A response cut into steps, each keeping its delimiter: rStar's markers when present,
    otherwise one step per line (blank lines join the next step)."""
    import re

    if any(d in text for d in delimiters):
        pattern = "(" + "|".join(re.escape(d) for d in delimiters) + ")"
        parts = re.split(pattern, text)
        steps = ["".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    else:
        steps = [line for line in text.splitlines(keepends=True)]
        merged: list[str] = []
        carry = ""
        for line in steps:
            if not line.strip():
                carry += line
                continue
            merged.append(carry + line)
            carry = ""
        if carry and merged:
            merged[-1] += carry
        steps = merged
    return [s for s in steps if s.strip()]


def make_eval_scorer(path: str, aggregate: str = "last", batch_size: int = 16):
    """An `evaluate.run` scorer: each sample's response is split into steps and scored by the
    process reward model; the sample's score is its last step's value or the minimum (`aggregate`).
    An outcome model scores the whole response."""
    from mathctl.engines import ChatText

    scorer = RewardScorer.from_pretrained(path, batch_size=batch_size)
    meta_path = Path(path) / RM_META
    kind = json.loads(meta_path.read_text()).get("kind", "process") if meta_path.is_file() else "process"

    def score(prompts: list[Any], samples: list[list[Any]]) -> list[list[float]]:
        items = []
        for prompt, group in zip(prompts, samples):
            # the policy's prompt as it saw it: raw text, or chat messages rendered by the RM's template
            text = prompt if isinstance(prompt, str) else ChatText(scorer.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True))
            for sample in group:
                steps = [sample.text] if kind == "outcome" else (split_steps(sample.text) or [sample.text])
                items.append((text, steps))
        values = scorer.score_many(items, raw_prompt=True)
        flat = iter([(v[-1] if aggregate == "last" else min(v)) if v else -math.inf for v in values])
        return [[next(flat) for _ in group] for group in samples]

    return score
