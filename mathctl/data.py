"""`mathctl data prepare`: training and RL data from the seeds' sources, as `datasets` folders.

Every source is read into one record shape first:

    problem   the question, as the model will see it (before the prompt template)
    solution  a worked solution ending in the final answer (SFT target; None for RL-only sources)
    answer    the gold final answer (RL reward, eval-style grading; None when unknown)
    source    where the row came from (dataset name, or the sub-source a dataset records)
    difficulty  a number when the source gives one (MATH level, DeepMath difficulty, Big-Math solve rate)

then turned into one of two outputs, saved with `Dataset.save_to_disk` plus `stats.json`:

    sft  messages -> chat template -> input_ids + labels (-100 where no loss, per `loss_on`), with
         problem/answer/source kept; optional packing to `seq_len` (rows of concatenated samples
         with `seq_lens`; `mathctl sft` splits them back and packs at run time).
    rl   prompt (the problem in the prompt template) + answer (+ source, difficulty); rows without a
         gold answer are dropped (they cannot be rewarded).

Scale: rows stay in Arrow files on disk (memory-mapped), transformed by `Dataset.map` with
`num_proc` workers; `--streaming` reads a hub source row by row without downloading it whole,
writing the output through `Dataset.from_generator`. Neither needs the source to fit in memory.

Sources (hub ids for users, `--input PATH` for local copies in the same schema):
    openmath2        nvidia/OpenMathInstruct-2 (split train_1M | train_2M | train_5M | train):
                     problem, generated_solution, expected_answer, problem_source
    am-r1-distilled  a-m-team/AM-DeepSeek-R1-Distilled-1.4M: messages with `info`; English subset (below)
    gsm8k            openai/gsm8k (main): question, answer ("... #### 18"); the calculator
                     annotations <<a*b=c>> are removed and "#### X" becomes "The final answer is \\boxed{X}."
    math             MATH train (DigitalLearningGmbH/MATH-lighteval): problem, solution, level, type;
                     gold = the last \\boxed{} of the solution
    big-math         SynthLabsAI/Big-Math-RL-Verified: problem, answer, source, llama8b_solve_rate (RL)
    deepmath         zwhe99/DeepMath-103K: question, final_answer, difficulty, r1_solution_1 (SFT target)
    deepscaler       agentica-org/DeepScaleR-Preview-Dataset: problem, answer, solution
    rstar            rStar-Math SFT rows: question (or prompt) + response (the code-augmented trace)
    jsonl / parquet  local files; `fields` maps problem/solution/answer/messages to column names
    synthetic        the built-in arithmetic word problems

English subset of AM-DeepSeek-R1-Distilled: a row is kept when at least 95% of the letters in its
user turn and in its answer are ASCII letters (A-Z, a-z). Letters are characters that Unicode calls
alphabetic; digits, LaTeX and punctuation do not count. This keeps English math (Greek letters in
LaTeX are written \\alpha) and drops Chinese, Japanese, Korean and Russian rows without a language
model (Instella-Math used langdetect; this rule needs no extra dependency and is deterministic).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mathctl.core.config import Strict
from mathctl.core.errors import ConfigError, DataError
from mathctl.rows import IGNORE

BATCH = 256  # rows per batched map call / streamed chunk
PACK_BATCH = 4096  # bins per packing map call
DEFAULT_PROMPT = "{problem}\nLet's think step by step and output the final answer within \\boxed{}."


# --- records ---------------------------------------------------------------------------------


def _boxed_last(text: str | None) -> str | None:
    from mathctl.grading import extract_boxed_all

    found = extract_boxed_all(text or "")
    return found[-1] if found else None


_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """GSM8K's worked answer -> (solution ending in \\boxed{X}, X)."""
    body, _, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    body = _CALC.sub("", body).strip()
    return f"{body}\nThe final answer is \\boxed{{{final}}}.", final


def english_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    return sum(c.isascii() for c in letters) / len(letters)


def _am_record(row: dict[str, Any]) -> dict[str, Any] | None:
    messages = row["messages"]
    user = next((m for m in messages if m.get("role") == "user"), None)
    reply = next((m for m in messages if m.get("role") == "assistant"), None)
    if user is None or reply is None:
        return None
    info = user.get("info") or {}
    content = reply.get("content") or ""
    if english_share(user.get("content") or "") < 0.95 or english_share(content) < 0.95:
        return None
    answer = info.get("reference_answer") or _boxed_last(content)
    return {"problem": user["content"], "solution": content, "answer": answer,
            "source": f"am-r1-distilled/{info.get('source') or 'unknown'}", "difficulty": None}


@dataclass(frozen=True)
class Source:
    name: str
    hub_id: str | None
    split: str
    required: tuple[str, ...]  # fields the first row must have
    to_record: Callable[[dict[str, Any]], dict[str, Any] | None]
    hub_config: str | None = None
    kinds: tuple[str, ...] = ("sft", "rl")
    description: str = ""


def _level(value: Any) -> float | None:
    match = re.search(r"\d+", str(value or ""))
    return float(match.group()) if match else None


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("openmath2", "nvidia/OpenMathInstruct-2", "train_1M", ("problem", "generated_solution", "expected_answer"),
           lambda r: {"problem": r["problem"], "solution": r["generated_solution"], "answer": r["expected_answer"],
                      "source": f"openmath2/{r.get('problem_source') or 'unknown'}", "difficulty": None},
           description="OpenMathInstruct-2 (splits train_1M, train_2M, train_5M, train)"),
    Source("am-r1-distilled", "a-m-team/AM-DeepSeek-R1-Distilled-1.4M", "train", ("messages",), _am_record,
           hub_config="am_0.9M", description="AM-DeepSeek-R1-Distilled, English subset (long CoT)"),
    Source("gsm8k", "openai/gsm8k", "train", ("question", "answer"),
           lambda r: dict(zip(("solution", "answer"), gsm8k_solution(r["answer"])), problem=r["question"],
                          source="gsm8k", difficulty=None),
           hub_config="main", description="GSM8K train"),
    Source("math", "DigitalLearningGmbH/MATH-lighteval", "train", ("problem", "solution"),
           lambda r: {"problem": r["problem"], "solution": r["solution"], "answer": _boxed_last(r["solution"]),
                      "source": f"math/{r.get('type') or 'unknown'}", "difficulty": _level(r.get("level"))},
           description="MATH train (gold from the last \\boxed{})"),
    Source("big-math", "SynthLabsAI/Big-Math-RL-Verified", "train", ("problem", "answer"),
           lambda r: {"problem": r["problem"], "solution": None, "answer": r["answer"],
                      "source": f"big-math/{r.get('source') or 'unknown'}", "difficulty": r.get("llama8b_solve_rate")},
           kinds=("rl",), description="Big-Math RL-verified (RL only: no solutions)"),
    Source("deepmath", "zwhe99/DeepMath-103K", "train", ("question", "final_answer"),
           lambda r: {"problem": r["question"], "solution": r.get("r1_solution_1"), "answer": r["final_answer"],
                      "source": f"deepmath/{r.get('topic') or 'unknown'}", "difficulty": r.get("difficulty")},
           description="DeepMath-103K (SFT target: r1_solution_1)"),
    Source("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", "train", ("problem", "answer"),
           lambda r: {"problem": r["problem"], "solution": r.get("solution"), "answer": r["answer"],
                      "source": "deepscaler", "difficulty": None},
           description="DeepScaleR-Preview (AIME, AMC, Omni-MATH, STILL)"),
    Source("rstar", None, "train", ("response",),
           lambda r: {"problem": r.get("question") or r.get("prompt"), "solution": r["response"],
                      "answer": r.get("answer") or _boxed_last(r["response"]), "source": "rstar", "difficulty": None},
           description="rStar-Math SFT rows (question + code-augmented response), local files"),
    Source("jsonl", None, "train", (), lambda r: r, description="a local JSONL file with a field mapping"),
    Source("parquet", None, "train", (), lambda r: r, description="a local Parquet file with a field mapping"),
    Source("synthetic", None, "train", (), lambda r: {"problem": r["problem"], "solution": r["solution"],
                                                      "answer": r["answer"], "source": "synthetic", "difficulty": None},
           description="built-in arithmetic word problems"),
]}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        import difflib

        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        raise ConfigError(f"unknown data source '{name}'",
                          hint=f"{'did you mean ' + close[0] + '? ' if close else ''}known: {', '.join(SOURCES)}")
    return SOURCES[name]


# --- config ----------------------------------------------------------------------------------


class FieldMap(Strict):
    """Column names of a local jsonl/parquet source (null: not present)."""

    problem: str | None = Field("problem", description="Column holding the problem.")
    solution: str | None = Field("solution", description="Column holding the worked solution (SFT target).")
    answer: str | None = Field("answer", description="Column holding the gold answer.")
    messages: str | None = Field(None, description="Column holding chat messages (instead of problem/solution).")


class PrepareConfig(Strict):
    """`mathctl data prepare` recipe."""

    step: Literal["data"] = "data"
    source: str = Field(description=f"One of: {', '.join(SOURCES)}.")
    input: str | None = Field(None, description="Local file or folder to read instead of the hub id.")
    split: str | None = Field(None, description="Hub split (openmath2: train_1M, train_2M, train_5M, train).")
    hub_config: str | None = Field(None, description="Hub config name (am-r1-distilled: am_0.5M or am_0.9M).")
    kind: Literal["sft", "rl"] = Field("sft", description="sft: tokenized with loss masks; rl: prompt + gold answer.")
    out: str = Field(description="Output folder (save_to_disk) with stats.json.")
    fields: FieldMap = Field(default_factory=FieldMap)
    limit: int | None = Field(None, ge=1, description="Only the first N source rows.")
    streaming: bool = Field(False, description="Read the hub source row by row instead of downloading it whole.")
    num_proc: int | None = Field(None, ge=1, description="Worker processes for map (non-streaming).")
    prompt_template: str = Field(DEFAULT_PROMPT, description="User turn / RL prompt; {problem} is replaced.")
    system_prompt: str | None = Field(None, description="Optional system message (sft).")
    tokenizer: str | None = Field(None, description="Tokenizer hub id or folder (sft); tiny:PRESET works.")
    chat_template: str = Field("tokenizer", description="tokenizer, chatml, tulu, llama3, rstar, plain, a .jinja path or inline Jinja.")
    loss_on: Literal["assistant", "completion", "all"] = Field("assistant", description="Tokens with loss (sft).")
    max_seq_len: int = Field(4096, ge=8, description="Longer samples are truncated or dropped (sft).")
    overflow: Literal["truncate", "drop"] = Field("drop", description="What happens to samples over max_seq_len.")
    pack: bool = Field(False, description="Pack samples into rows of up to seq_len tokens (sft).")
    seq_len: int | None = Field(None, ge=8, description="Packed row length; default max_seq_len.")
    synthetic_rows: int = Field(1000, ge=1, description="Rows of the synthetic source.")
    seed: int = Field(0, description="Synthetic source seed.")

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        source = get_source(self.source)
        if self.kind not in source.kinds:
            raise ValueError(f"source {self.source} has no solutions, so kind=sft is impossible; use --kind rl")
        if "{problem}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {problem}")
        if self.kind == "sft" and not self.tokenizer:
            raise ValueError("kind=sft needs a tokenizer (--tokenizer MODEL, e.g. Qwen/Qwen2.5-Math-7B or tiny:qwen2-tiny)")
        if self.source in ("jsonl", "parquet", "rstar") and not self.input:
            raise ValueError(f"source {self.source} reads a local file: give --input PATH")
        if self.pack and self.seq_len is not None and self.seq_len < self.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) must be at least max_seq_len ({self.max_seq_len}) so every sample fits")
        return self


# --- reading ---------------------------------------------------------------------------------


def load_raw(cfg: PrepareConfig):
    """The source rows as a `datasets.Dataset` (Arrow on disk) or, streaming, an `IterableDataset`."""
    import datasets

    source = get_source(cfg.source)
    if cfg.source == "synthetic":
        from mathctl.synthetic import SyntheticSpec, generate

        return datasets.Dataset.from_list(generate(SyntheticSpec(num_problems=cfg.synthetic_rows, seed=cfg.seed,
                                                                 max_digits=1)))
    if cfg.input:
        path = Path(cfg.input).expanduser()
        if not path.exists():
            raise DataError(f"input {path} does not exist", hint="check --input (a .jsonl/.json/.parquet file or a folder)")
        try:
            if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[cfg.split or source.split]
            elif path.is_dir():
                files = sorted(str(p) for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
                if not files:
                    raise DataError(f"folder {path} holds no .jsonl/.json/.parquet files", hint="point --input at data files")
                builder = "parquet" if files[0].endswith(".parquet") else "json"
                ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming)
            else:
                builder = "parquet" if path.suffix == ".parquet" else "json"
                ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=cfg.streaming)
        except DataError:
            raise
        except Exception as exc:
            if path.suffix == ".jsonl":
                _raise_bad_line(path)
            raise DataError(f"cannot read {path}: {_first_line(exc)}", hint="check the file's format") from None
    else:
        if source.hub_id is None:
            raise DataError(f"source {cfg.source} has no hub copy", hint="give --input PATH")
        try:
            ds = datasets.load_dataset(source.hub_id, cfg.hub_config or source.hub_config,
                                       split=cfg.split or source.split, streaming=cfg.streaming)
        except Exception as exc:
            raise DataError(f"cannot load {source.hub_id}: {_first_line(exc)}",
                            hint="give --input PATH with a local copy, or make the hub reachable") from None
    if cfg.limit:
        ds = ds.take(cfg.limit) if cfg.streaming else ds.select(range(min(cfg.limit, len(ds))))
    return ds


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _raise_bad_line(path: Path) -> None:
    """After datasets failed on a JSONL file: name the malformed line (its own error does not say where)."""
    from mathctl.core.io import iter_jsonl

    for _ in iter_jsonl(path):
        pass


def _record_fn(cfg: PrepareConfig) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    source = get_source(cfg.source)
    if cfg.source not in ("jsonl", "parquet"):
        return source.to_record
    f = cfg.fields

    def mapped(row: dict[str, Any]) -> dict[str, Any] | None:
        if f.messages:
            messages = row[f.messages]
            user = next((m["content"] for m in messages if m["role"] == "user"), None)
            reply = next((m["content"] for m in messages if m["role"] == "assistant"), None)
            return {"problem": user, "solution": reply, "answer": row.get(f.answer) if f.answer else None,
                    "source": cfg.source, "difficulty": None}
        return {"problem": row[f.problem], "solution": row.get(f.solution) if f.solution else None,
                "answer": row.get(f.answer) if f.answer else None, "source": cfg.source, "difficulty": None}

    return mapped


def required_fields(cfg: PrepareConfig) -> list[str]:
    if cfg.source in ("jsonl", "parquet"):
        f = cfg.fields
        if f.messages:
            return [f.messages]
        need = [f.problem] + ([f.solution] if cfg.kind == "sft" else [f.answer])
        return [n for n in need if n]
    return list(get_source(cfg.source).required)


def check_first_row(cfg: PrepareConfig, row: dict[str, Any]) -> None:
    missing = [name for name in required_fields(cfg) if name not in row]
    if missing:
        where = cfg.input or get_source(cfg.source).hub_id
        raise DataError(f"source {cfg.source} ({where}): field {', '.join(missing)} missing in the first row "
                        f"(its fields: {', '.join(sorted(row)) or 'none'}); first row: {json.dumps(row, default=str)[:200]}",
                        hint="pick the source that matches the file, or map the columns with fields.problem=... "
                             "fields.solution=... fields.answer=... (jsonl/parquet)")


# --- transforms ------------------------------------------------------------------------------


def to_messages(record: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": cfg.prompt_template.replace("{problem}", str(record["problem"]))})
    messages.append({"role": "assistant", "content": str(record["solution"])})
    return messages


class Transformer:
    """Source rows -> output rows (dropped ones carry the reason in `dropped`). Picklable for
    `map(num_proc=...)`; `batch` is the batched form `Dataset.map(batched=True)` calls, which encodes
    a whole batch of conversations in one call to the fast tokenizer."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.to_record = _record_fn(cfg)
        self.tokenizer = None
        self.advance: Callable[[int], None] | None = None  # progress callback (in-process runs only)
        if cfg.kind == "sft":
            from mathctl.core.config import ModelSpec
            from mathctl.models import load_tokenizer

            self.tokenizer = load_tokenizer(ModelSpec(path=cfg.tokenizer, chat_template=cfg.chat_template))

    def __getstate__(self) -> dict[str, Any]:  # workers and datasets' fingerprint get no progress bar
        return {**self.__dict__, "advance": None}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.rows([row])[0]

    def batch(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        names = list(columns)
        count = len(columns[names[0]]) if names else 0
        out = self.rows([{name: columns[name][k] for name in names} for k in range(count)])
        return {key: [row[key] for row in out] for key in (out[0] if out else self._blank())}

    def rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from mathctl.rows import tokenize_conversations

        cfg = self.cfg
        out: list[dict[str, Any]] = []
        pending: list[tuple[int, list[dict[str, str]]]] = []  # (index in out, messages) to tokenize
        for row in rows:
            head, record = self._head(row)
            if head.get("dropped") is not None:
                out.append(head)
            elif cfg.kind == "rl":
                out.append({**head, "prompt": cfg.prompt_template.replace("{problem}", head["problem"]), "dropped": ""})
            else:
                pending.append((len(out), to_messages(record, cfg)))
                out.append(head)
        if pending:
            encoded = tokenize_conversations([m for _, m in pending], self.tokenizer, cfg.loss_on, cfg.max_seq_len)
            for (k, _), tok in zip(pending, encoded):
                out[k] = {**out[k], **self._finish(tok)}
        if self.advance is not None:
            self.advance(len(rows))
        return out

    def _head(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Metadata of a row, with `dropped` set when it is dropped before tokenizing."""
        record = self.to_record(row)
        if record is None:
            return {"problem": "", "answer": "", "source": "", "difficulty": None, **self._blank(),
                    "dropped": "filtered"}, None
        answer = record.get("answer")
        head = {"problem": str(record.get("problem") or ""), "answer": "" if answer is None else str(answer),
                "source": record.get("source") or self.cfg.source,
                "difficulty": None if record.get("difficulty") is None else float(record["difficulty"])}
        if not head["problem"].strip():
            reason = "no_problem"
        elif self.cfg.kind == "rl":
            reason = None if head["answer"].strip() else "no_answer"
        else:
            reason = None if str(record.get("solution") or "").strip() else "no_solution"
        if reason:
            return {**head, **self._blank(), "dropped": reason}, record
        return head, record

    def _finish(self, tok: dict[str, Any]) -> dict[str, Any]:
        labels = tok["labels"]
        trained = len(labels) - labels.count(IGNORE)
        if tok["truncated"] and self.cfg.overflow == "drop":
            return {**self._blank(), "length": tok["length"], "dropped": "too_long"}
        if trained - (labels[0] != IGNORE if labels else 0) == 0:  # the first label is never a target
            return {**self._blank(), "length": tok["length"], "dropped": "no_trained_tokens"}
        return {"input_ids": tok["input_ids"], "labels": labels, "length": len(tok["input_ids"]),
                "trained": trained, "truncated": tok["truncated"], "dropped": ""}

    def _blank(self) -> dict[str, Any]:
        if self.cfg.kind == "rl":
            return {"prompt": ""}
        return {"input_ids": [], "labels": [], "length": 0, "trained": 0, "truncated": False}


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices, each at most `capacity` tokens (a longer sample
    gets a bin of its own). Open bins are bucketed by free space, so placing a sample is a binary
    search over at most `capacity` distinct values: O(n log capacity), fine for millions of rows.
    Within a bin, samples keep their original order."""
    import bisect

    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free tokens -> open bins with exactly that much room
    free_values: list[int] = []  # sorted distinct keys of by_free
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        need = lengths[i]
        at = bisect.bisect_left(free_values, need)
        if need <= capacity and at < len(free_values):
            free = free_values[at]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_values.pop(at)
        else:
            b, free = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = free - need
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(b)
    return [sorted(b) for b in bins]


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


# --- run -------------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Read, transform, filter, (pack,) save; returns stats (also written to OUT/stats.json)."""

    from mathctl.core.console import log, progress
    from mathctl.core.io import atomic_write_json

    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} is not empty", hint="choose a new --out folder")
    began = time.perf_counter()
    raw = load_raw(cfg)
    first = next(iter(raw), None)
    if first is None:
        raise DataError(f"source {cfg.source} has no rows", hint="check --input / --split")
    check_first_row(cfg, first)
    transform = Transformer(cfg)
    spill = out.parent / f".{out.name}.stream"  # streaming: the transformed rows land here as Arrow first
    in_process = cfg.streaming or not cfg.num_proc or cfg.num_proc == 1
    with progress(f"{cfg.source} -> {cfg.kind}", None if cfg.streaming else len(raw), enabled=in_process) as advance:
        transform.advance = advance
        if cfg.streaming:
            import shutil

            import datasets

            shutil.rmtree(spill, ignore_errors=True)  # never reuse an earlier (maybe interrupted) spill
            processed = datasets.Dataset.from_generator(_stream_rows, gen_kwargs={"raw": raw, "transform": transform},
                                                        cache_dir=str(spill))
        else:
            processed = raw.map(transform.batch, batched=True, batch_size=BATCH, remove_columns=raw.column_names,
                                num_proc=cfg.num_proc, desc=f"{cfg.source} -> {cfg.kind}")
        transform.advance = None
    kept, counts = _split_dropped(processed)
    if len(kept) == 0:
        raise DataError(f"no row of {cfg.source} survived preparation ({counts})", hint="check the source and settings")
    stats: dict[str, Any] = {"source": cfg.source, "kind": cfg.kind, "rows_in": counts.pop("rows_in"),
                             "rows_out": len(kept), "dropped": counts}
    if cfg.kind == "sft":
        lengths = kept["length"][:]  # [:] reads the column in one go (iterating a Column goes row by row)
        stats.update(tokens=sum(lengths), trained_tokens=sum(kept["trained"][:]), truncated=sum(kept["truncated"][:]),
                     length_percentiles=percentiles(lengths))
        if cfg.pack:
            kept = _pack_dataset(kept, cfg.seq_len or cfg.max_seq_len)
            stats.update(packed_rows=len(kept), seq_len=cfg.seq_len or cfg.max_seq_len,
                         fill=round(stats["tokens"] / (len(kept) * (cfg.seq_len or cfg.max_seq_len)), 4))
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    kept.save_to_disk(str(tmp))
    stats["seconds"] = round(time.perf_counter() - began, 3)
    if cfg.kind == "sft":
        stats["tokens_per_second"] = round(stats["tokens"] / max(stats["seconds"], 1e-9), 1)
    stats["config"] = cfg.model_dump(mode="json")
    atomic_write_json(tmp / "stats.json", stats)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    if spill.exists():
        import shutil

        shutil.rmtree(spill, ignore_errors=True)
    log(f"{cfg.source}: {stats['rows_out']} of {stats['rows_in']} rows -> {out}")
    return stats


def _stream_rows(raw, transform: Transformer, batch: int = BATCH) -> Iterator[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for row in raw:
        rows.append(row)
        if len(rows) == batch:
            yield from transform.rows(rows)
            rows = []
    if rows:
        yield from transform.rows(rows)


def _split_dropped(processed):
    reasons = processed["dropped"][:]
    counts: dict[str, int] = {"rows_in": len(reasons)}
    for reason in reasons:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    if len(counts) > 1:
        processed = processed.filter(lambda rs: [not r for r in rs], input_columns=["dropped"], batched=True)
    kept = processed.remove_columns(["dropped"])
    return kept, counts


def _pack_dataset(ds, capacity: int):
    """Packed rows, built in Arrow: a `map` over batches of bins takes the bins' samples (one Arrow
    `take` per batch) and regroups them by new list offsets, so no token passes through Python and
    memory holds one batch of bins, not the dataset."""
    import datasets
    import numpy as np
    import pyarrow as pa

    bins = pack(ds["length"][:], capacity)
    source = ds.select_columns(["input_ids", "labels", "length", "problem"]).with_format("arrow")

    def build(batch: pa.Table) -> pa.Table:
        members = batch.column("members").combine_chunks()
        bounds = np.asarray(members.offsets) - members.offsets[0].as_py()  # sample index bounds of each bin
        samples = source[np.asarray(members.flatten()).tolist()]
        lengths = np.asarray(samples.column("length").combine_chunks(), dtype=np.int64)
        token_bounds = np.concatenate([[0], np.cumsum(lengths)])[bounds]  # token bounds of each bin

        def regroup(column: str, offsets: np.ndarray) -> pa.Array:
            values = samples.column(column).combine_chunks()
            if column in ("input_ids", "labels"):
                values = values.flatten()
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)

        return pa.table({"input_ids": regroup("input_ids", token_bounds), "labels": regroup("labels", token_bounds),
                         "seq_lens": pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), pa.array(lengths)),
                         "problems": regroup("problem", bounds), "length": pa.array(np.diff(token_bounds))})

    binned = datasets.Dataset.from_dict({"members": bins}).with_format("arrow")
    packed = binned.map(build, batched=True, batch_size=PACK_BATCH, remove_columns=["members"], desc="packing")
    return packed.with_format(None)
