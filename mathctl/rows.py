"""Rows of training and search data, and conversations as token ids with loss labels.

Shared below the steps: sft trains on these rows, grpo and mcts-sample read their problems with
`load_rows`, and `mathctl data` tokenises with `tokenize_conversations` exactly as sft does.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mathctl.core.config import Strict
from mathctl.core.errors import DataError

IGNORE = -100  # the label of a token that carries no loss


class SyntheticData(Strict):
    """The built-in arithmetic word problems (see mathctl/synthetic.py)."""

    num_problems: int = Field(2000, ge=1, description="Rows generated.")
    seed: int = Field(0, description="Generator seed; problem i of a seed never changes.")
    max_digits: int = Field(2, ge=1, le=6, description="Digits per operand.")
    min_ops: int = Field(1, ge=1, description="Fewest operations per problem.")
    max_ops: int = Field(2, ge=1, description="Most operations per problem.")
    ops: str = Field("+-", pattern=r"^[+\-*]+$", description="Operations to draw from: any of + - *.")
    format: Literal["text", "code"] = Field(
        "text", description="Solution format: text (one sentence per step) or code (rStar-Math's code-augmented "
        "steps with <code>, <end_of_step>, <end_of_code>, <output>, <answer>; see mathctl/synthetic.py).")


def load_rows(source: str, *, synthetic: SyntheticData | None = None, subset: str | None = None,
              split: str = "train") -> list[dict[str, Any]]:
    """Raw rows (a list of dicts) of `source`: `synthetic` (the generator with `synthetic`'s settings), a
    .jsonl/.json/.parquet file, a data folder (`mathctl data` output or data files), or a hub dataset id."""
    if source == "synthetic":
        from mathctl.synthetic import SyntheticSpec, generate

        s = synthetic or SyntheticData()
        return generate(SyntheticSpec(num_problems=s.num_problems, seed=s.seed, max_digits=s.max_digits,
                                      min_ops=s.min_ops, max_ops=s.max_ops, ops=s.ops, format=s.format))
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        from mathctl.core.io import read_jsonl

        return read_jsonl(path)
    if path.suffix in {".json", ".parquet"}:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist", hint="check data.source")
        import datasets

        try:
            return datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train").to_list()
        except Exception as exc:  # pyarrow/json errors
            raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}", hint="check the file's format") from None
    if path.is_dir():
        return _load_folder(path, split)
    if path.exists() or str(source).startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"data source {source} does not exist",
                        hint="give synthetic, a .jsonl/.json/.parquet file, a data folder, or a hub dataset id")
    import datasets

    try:
        ds = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:  # offline, gated, unknown id
        raise DataError(f"cannot load hub dataset {source}: {str(exc).splitlines()[0]}",
                        hint="prepare it with `mathctl data` and point data.source at the folder, or make the hub reachable") from None
    return ds.to_list()


def _load_folder(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} has no split {split}", hint=f"set data.split to one of {list(loaded)}")
            loaded = loaded[split]
        return loaded.to_list()
    files = sorted(p for p in path.iterdir() if p.suffix in {".jsonl", ".json", ".parquet"})
    if not files:
        raise DataError(f"data folder {path} holds no dataset", hint="point data.source at a mathctl data folder or data files")
    rows: list[dict[str, Any]] = []
    for file in files:
        rows += load_rows(str(file), split=split)
    return rows


def conversation_spans(messages: list[dict[str, str]], tokenizer, loss_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss.

    The assistant span of turn i is [len(render(messages[:i], gen_prompt=True)), len(render(messages[:i+1])));
    with `completion` the header [len(render(messages[:i])), ...) is trained too. A template that does
    not render conversations prefix by prefix is refused (no mask could be derived from it).
    """
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = full if i == last else render(messages[: i + 1], tokenize=False)
        before = header
        if loss_on == "completion":
            before = render(messages[:i], tokenize=False, add_generation_prompt=False) if i else ""
        if not (full.startswith(through) and through.startswith(header) and header.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix; loss masks cannot be derived",
                            hint="choose another model.chat_template (chatml, tulu, llama3, rstar, plain)")
        spans.append((len(before), len(through)))
    return full, spans


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], loss_on: str,
                 max_len: int) -> dict[str, Any]:
    """Labels from one tokenisation of the full text: a token is trained when its first character lies
    in a trained span (a zero-width token when its position is inside the span or at its end), so BPE
    merges across a span boundary cannot shift the mask."""
    n = len(ids)
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE] * n
        starts = [start for start, _ in offsets]
        if starts == sorted(starts):  # the usual case: spans are index ranges, found by bisection
            for s, e in spans:
                lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
                labels[lo:hi] = ids[lo:hi]
                k = hi
                while k < n and starts[k] == e:  # zero-width tokens right at the span's end
                    if offsets[k][1] == e:
                        labels[k] = ids[k]
                    k += 1
        else:
            for k, (start, end) in enumerate(offsets):
                if any(s <= start < e or (start == end and s < end <= e) for s, e in spans):
                    labels[k] = ids[k]
    return {"input_ids": list(ids[:max_len]), "labels": labels[:max_len], "truncated": n > max_len, "length": n}


def tokenize_conversation(messages: list[dict[str, str]], tokenizer, loss_on: str, max_len: int) -> dict[str, Any]:
    """Render with the chat template, tokenize once, and label only the trained character spans."""
    return tokenize_conversations([messages], tokenizer, loss_on, max_len)[0]


def tokenize_conversations(conversations: list[list[dict[str, str]]], tokenizer, loss_on: str,
                           max_len: int) -> list[dict[str, Any]]:
    """`tokenize_conversation` for many: the texts are encoded in one batch (the fast tokenizer
    spreads a batch over its threads)."""
    rendered = [conversation_spans(messages, tokenizer, loss_on) for messages in conversations]
    texts = [text for text, _ in rendered]
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:  # straight to the Rust tokenizer: only ids and offsets are converted to Python
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        pairs = [(enc.ids, enc.offsets) for enc in encodings]
    else:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
    return [label_tokens(ids, offsets, spans, loss_on, max_len) for (ids, offsets), (_, spans) in zip(pairs, rendered)]
