"""ProcessBench: how well a process reward model finds the earliest wrong step of a solution.

`mathctl eval processbench --prm PATH` (no policy model: the solutions are given). ProcessBench
(Zheng et al. 2024, QwenLM/ProcessBench) holds 3,400 solutions to gsm8k, MATH, OlympiadBench and
Omni-MATH problems, each a list of steps with `label`: the 0-based index of the earliest wrong step,
or -1 when every step is right. Records, as the hub dataset `Qwen/ProcessBench` (one split per
source) and the repository's JSON files hold them:

    {"id": "gsm8k-0", "generator": "Qwen2-7B-Instruct", "problem": "...", "steps": ["...", "..."],
     "final_answer_correct": false, "label": 1}

Scoring: the PRM reads the problem (through its chat template and the prompt template it was trained
with, `final/mathctl_rm.json`) followed by the steps, each ending with `eval.processbench.step_separator`
("\\n": the plain-text steps `mathctl rm` and `mcts-sample` use), and scores every step at its last
non-whitespace token in one forward pass (`mathctl.scoring.RewardScorer`, as in training and search).
The predicted earliest error is the first step whose score is below the threshold; -1 when none is.

Metrics per split, as ProcessBench's own evaluation computes them: `error_accuracy` over the erroneous
solutions (label != -1; right when the predicted step equals the label), `correct_accuracy` over the
correct ones (label == -1; right when the prediction is -1 too), and `f1`, their harmonic mean. The
headline is `average_f1`, the mean of the splits' F1. Fractions here; the table shows percentages.

Threshold: given (`eval.processbench.threshold`, `--threshold`), all solutions are reported. Else it is
chosen: a seeded part of each split (`calibration_fraction`, per split and per class: erroneous and
correct solutions are drawn separately) picks the threshold that maximises the mean F1 of the splits'
calibration parts, and the metrics are reported on the rest only (`select_calibration`,
`choose_threshold`). A PPM's scores are logits on no fixed scale (its loss sees only differences), so a
fixed threshold such as 0.5 means nothing for it.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from mathctl.core.config import Strict
from mathctl.core.errors import ConfigError, DataError, GateFailed

TASK = "processbench"
SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
HUB_ID = "Qwen/ProcessBench"
# Bump when the scoring text, the metric or the threshold choice changes: written into summary.json.
VERSION = 1
HINT_RECORD = ("each record needs `problem` (text), `steps` (a non-empty list of step texts) and `label` (-1, or "
               "the 0-based index of the earliest wrong step), as in ProcessBench; see docs/eval.md")

Split = Literal["gsm8k", "math", "olympiadbench", "omnimath"]
StepScorer = Callable[[list[tuple[str, list[str]]]], list[list[float]]]


class ProcessBenchSettings(Strict):
    """`eval.tasks: [processbench]`: score ProcessBench's solutions with `eval.prm`, step by step."""

    splits: list[Split] = Field(list(SPLITS), min_length=1, description="ProcessBench splits to evaluate; each "
                                "reads processbench/SPLIT.json under eval.data_dir, else the hub's Qwen/ProcessBench.")
    threshold: float | None = Field(None, description="A step scoring below this is an error (`--threshold`); "
                                    "null: chosen on a calibration part of each split (calibration_fraction).")
    calibration_fraction: float = Field(0.1, gt=0, lt=1, description="Without a threshold: the share of each "
                                        "split's erroneous and of its correct solutions that picks the threshold "
                                        "maximising the mean F1; the metrics are reported on the rest.")
    calibration_seed: int = Field(0, description="Seed of the calibration draw.")
    step_separator: str = Field("\n", description="Appended to each step (unless it ends with it already), as the "
                                "PRM's steps ended in training: \\n for plain-text steps.")

    @field_validator("splits")
    @classmethod
    def _once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a split is listed twice: {', '.join(value)}; name each split once")
        return value


# --- records ----------------------------------------------------------------------------------


def check_record(row: Any, where: str) -> dict[str, Any]:
    """One ProcessBench record, checked; `where` names it in errors.

    Raises:
        DataError: a required field is missing or has the wrong type, or the label is out of range.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}", hint=HINT_RECORD)
    if isinstance(row.get("id"), (str, int)):
        where = f"{where} (id {row['id']})"
    for field in ("problem", "steps", "label"):
        if field not in row:
            raise DataError(f"{where}: no field '{field}' (fields: {', '.join(sorted(row)) or 'none'})",
                            hint=HINT_RECORD)
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise DataError(f"{where}: field 'problem' must be a non-empty string", hint=HINT_RECORD)
    steps = row["steps"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise DataError(f"{where}: field 'steps' must be a non-empty list of non-empty strings", hint=HINT_RECORD)
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        raise DataError(f"{where}: label {label!r} is not -1 or a step index 0..{len(steps) - 1}", hint=HINT_RECORD)
    return {"id": row.get("id"), "generator": row.get("generator"), "problem": row["problem"], "steps": steps,
            "label": label, "final_answer_correct": row.get("final_answer_correct")}


def read_split_file(path: Path) -> list[dict[str, Any]]:
    """A split's records from ProcessBench's JSON file (one list of records)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                        hint="the file must be one JSON list of ProcessBench records") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="check the file") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}",
                        hint="the file must be one JSON list of ProcessBench records")
    return [check_record(row, f"{path} record {k + 1}") for k, row in enumerate(rows)]


def _load_hub(split: str) -> list[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(HUB_ID, split=split)
    except Exception as exc:  # offline, gated, renamed: all fixed by giving local files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"processbench {split}: cannot load {HUB_ID} from the hub ({first})",
                        hint=f"pass --data-dir with processbench/{split}.json (a JSON list of records)") from None
    return [check_record(dict(row), f"{HUB_ID}:{split} row {k + 1}") for k, row in enumerate(ds)]


def load_splits(settings: ProcessBenchSettings, data_dir: Path | None, limit: int | None = None,
                hub_loader: Callable[[str], list[dict[str, Any]]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each split's records (`limit` of each, spread through the file: `spread`), with their position in the
    file as `index`: from
    `data_dir/processbench/SPLIT.json` when a data folder is given, else from the hub.

    Raises:
        DataError: a file is missing or malformed, a record is malformed, a split is empty.
    """
    out = {}
    for split in settings.splits:
        if data_dir is not None:
            path = data_dir / TASK / f"{split}.json"
            if not path.is_file():
                raise DataError(f"processbench: {path} does not exist",
                                hint=f"put ProcessBench's {split}.json under {data_dir / TASK}, or evaluate fewer "
                                     f"splits: eval.processbench.splits=[{', '.join(s for s in settings.splits if s != split) or 'gsm8k'}]")
            records = read_split_file(path)
        else:
            records = (hub_loader or _load_hub)(split)
        if not records:
            raise DataError(f"processbench {split}: no records", hint="give a file with at least one record")
        out[split] = [records[k] | {"index": k} for k in spread(len(records), limit)]
    return out


def spread(count: int, limit: int | None) -> list[int]:
    """`limit` positions of `count` spread evenly from the first (all of them without a limit). Not the first
    `limit`: ProcessBench's files list the solutions with a wrong final answer first, so the first N are
    nearly all erroneous."""
    if not limit or limit >= count:
        return list(range(count))
    return [k * count // limit for k in range(limit)]


# --- metric -----------------------------------------------------------------------------------


def first_error(scores: Sequence[float], threshold: float) -> int:
    """The predicted earliest error: the first step whose score is below `threshold`; -1 when none is."""
    return next((k for k, s in enumerate(scores) if s < threshold), -1)


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """F1 of two accuracies; 0 when both are 0, None when either is undefined (no solutions of a class)."""
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def split_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's metrics of one split: accuracy on the erroneous and on the correct solutions, F1."""
    erroneous = [p == y for y, p in zip(labels, predictions) if y != -1]
    correct = [p == -1 for y, p in zip(labels, predictions) if y == -1]
    error_accuracy = sum(erroneous) / len(erroneous) if erroneous else None
    correct_accuracy = sum(correct) / len(correct) if correct else None
    return {"solutions": len(labels), "erroneous": len(erroneous), "correct": len(correct),
            "error_accuracy": error_accuracy, "correct_accuracy": correct_accuracy,
            "f1": harmonic_mean(error_accuracy, correct_accuracy)}


def match_interval(scores: Sequence[float], label: int) -> tuple[float, float]:
    """The thresholds t that predict `label`, as the half-open interval lo < t <= hi (empty when lo >= hi).

    Label -1 needs no step below t: t <= min(scores). Label L needs step L below t and none before it:
    scores[L] < t <= min(scores[:L]) (no upper bound for L == 0)."""
    if label == -1:
        return -math.inf, min(scores)
    return scores[label], min(scores[:label], default=math.inf)


def select_calibration(splits: dict[str, list[dict[str, Any]]], fraction: float, seed: int) -> set[tuple[str, int]]:
    """The (split, index) of the calibration part: in each split, the erroneous and the correct solutions
    are shuffled apart (random.Random(f"{seed}:{split}:{class}")) and the first round(fraction * count) of
    each are drawn, at least one (and at most count - 1) when a class has 2 or more solutions, so both
    parts keep an example of it."""
    chosen = set()
    for split, records in splits.items():
        for kind in ("erroneous", "correct"):
            indices = [r["index"] for r in records if (r["label"] != -1) == (kind == "erroneous")]
            if len(indices) < 2:
                continue
            count = min(max(round(fraction * len(indices)), 1), len(indices) - 1)
            random.Random(f"{seed}:{split}:{kind}").shuffle(indices)
            chosen.update((split, i) for i in indices[:count])
    return chosen


def choose_threshold(groups: dict[str, list[tuple[Sequence[float], int]]]) -> tuple[float, float]:
    """The threshold that maximises the mean F1 over the groups (splits) of (step scores, label) pairs;
    returns it and that mean F1. Groups without both erroneous and correct solutions do not count.

    Every solution is predicted right on an interval of thresholds (`match_interval`), so the F1s change
    only at the intervals' ends. Candidates: the lowest end (no step is below it), the midpoint between
    each two neighbouring ends, and the highest end + 1 (every step is below it). Among the candidates
    that reach the best mean (within 1e-12), the middle one (lower median) is taken.

    Raises:
        ConfigError: no group has both erroneous and correct solutions.
    """
    counted = {}
    for name, pairs in groups.items():
        err = [match_interval(s, y) for s, y in pairs if y != -1]
        cor = [match_interval(s, y)[1] for s, y in pairs if y == -1]
        if err and cor:
            live = [(lo, hi) for lo, hi in err if lo < hi]
            counted[name] = (sorted(lo for lo, _ in live), sorted(hi for _, hi in live), len(err), sorted(cor))
    if not counted:
        raise ConfigError("no ProcessBench split has both erroneous and correct solutions in its calibration part, "
                          "so no threshold can be chosen", hint="give eval.processbench.threshold (--threshold), "
                          "raise eval.processbench.calibration_fraction, or evaluate more solutions (--limit)")
    ends = sorted({v for lows, highs, _, cor in counted.values() for v in (*lows, *highs, *cor) if math.isfinite(v)})
    candidates = [ends[0]] + [(a + b) / 2 for a, b in zip(ends, ends[1:])] + [ends[-1] + 1.0]

    def mean_f1(t: float) -> float:
        total = 0.0
        for lows, highs, n_err, cor in counted.values():
            hits_err = bisect.bisect_left(lows, t) - bisect.bisect_left(highs, t)  # lo < t <= hi
            hits_cor = len(cor) - bisect.bisect_left(cor, t)  # t <= min(scores)
            total += harmonic_mean(hits_err / n_err, hits_cor / len(cor))
        return total / len(counted)

    values = [mean_f1(t) for t in candidates]
    best = max(values)
    tied = [t for t, v in zip(candidates, values) if v >= best - 1e-12]
    return tied[(len(tied) - 1) // 2], best


def score_text_steps(steps: list[str], separator: str) -> list[str]:
    """The steps as the PRM reads them: each ending with the separator (unless it does already)."""
    return [s if not separator or s.endswith(separator) else s + separator for s in steps]


# --- run --------------------------------------------------------------------------------------


def run(cfg: Any, run_dir: Any, *, splits: dict[str, list[dict[str, Any]]] | None = None,
        scorer: StepScorer | None = None) -> dict[str, Any]:
    """Score every solution of `splits` (default: `load_splits`) with the PRM `cfg.eval.prm`, appending one
    results.jsonl line per solution (a resumed run skips those already there), then choose or apply the
    threshold and write summary.json. `cfg` is an `EvalConfig` whose only task is processbench; `scorer`
    replaces the PRM (tests): it maps (problem, steps) pairs to one score per step."""
    from mathctl.benchmarks import resolve_data_dir
    from mathctl.core.console import log, progress
    from mathctl.core.io import read_appended

    settings: ProcessBenchSettings = cfg.eval.processbench
    if splits is None:
        splits = load_splits(settings, resolve_data_dir(cfg.eval.data_dir), cfg.eval.limit)
    results_path = run_dir.path / "results.jsonl"
    done = {(r["split"], r["index"]) for r in read_appended(results_path, repair=True)}
    todo = [r | {"split": name} for name, records in splits.items() for r in records if (name, r["index"]) not in done]
    if done:
        log(f"resuming: {len(done)} solutions already in {results_path}")

    close = None
    kind = prm_kind(cfg.eval.prm) if scorer is None else None
    if scorer is None and todo:
        from mathctl.scoring import RewardScorer

        model = RewardScorer.from_pretrained(cfg.eval.prm, batch_size=cfg.eval.prm_batch_size)
        scorer, close = model.score_many, model.close
        log(f"scoring steps with {cfg.eval.prm} (a {kind or 'reward'} model), each step ending in "
            f"{settings.step_separator!r}")
    chunk_size = cfg.eval.chunk_problems or max(64, 4 * cfg.eval.prm_batch_size)
    try:
        with progress("processbench", len(todo)) as advance:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                began = time.perf_counter()
                values = scorer([(r["problem"], score_text_steps(r["steps"], settings.step_separator)) for r in chunk])
                seconds = (time.perf_counter() - began) / len(chunk)
                with results_path.open("a", encoding="utf-8") as handle:
                    for record, scores in zip(chunk, values):
                        if len(scores) != len(record["steps"]):
                            raise RuntimeError(f"{len(scores)} scores for {len(record['steps'])} steps")
                        handle.write(json.dumps({
                            "split": record["split"], "index": record["index"], "id": record["id"],
                            "generator": record["generator"], "label": record["label"],
                            "final_answer_correct": record["final_answer_correct"], "num_steps": len(scores),
                            "step_scores": [float(v) for v in scores], "seconds": round(seconds, 4),
                        }, ensure_ascii=False) + "\n")
                    handle.flush()
                advance(len(chunk), split=chunk[-1]["split"])
    finally:
        if close is not None:
            close()
    return write_summary(cfg, run_dir, list(splits), kind=kind)


def prm_kind(path: str) -> str | None:
    """`process` or `outcome`, as the reward model's folder records it (`mathctl rm`); None when it does not.
    An outcome model scores each step too: its value at a step's end judges the solution up to there."""
    from mathctl.scoring import RM_META

    meta = Path(path).expanduser() / RM_META
    return json.loads(meta.read_text()).get("kind") if meta.is_file() else None


def write_summary(cfg: Any, run_dir: Any, split_names: list[str], *, kind: str | None = None) -> dict[str, Any]:
    """Predictions and metrics from results.jsonl alone: the threshold (given or chosen), each record's
    `part`, `prediction` and `match` (results.jsonl rewritten with them), summary.json; marks the run
    completed."""
    from mathctl.core.io import atomic_write_text, read_appended

    settings: ProcessBenchSettings = cfg.eval.processbench
    results_path = run_dir.path / "results.jsonl"
    records = sorted((r for r in read_appended(results_path) if r["split"] in split_names),
                     key=lambda r: (split_names.index(r["split"]), r["index"]))
    calibration: dict[str, Any] | None = None
    if settings.threshold is not None:
        threshold, held = settings.threshold, set()
    else:
        by_split = {name: [r for r in records if r["split"] == name] for name in split_names}
        held = select_calibration(by_split, settings.calibration_fraction, settings.calibration_seed)
        groups = {name: [(r["step_scores"], r["label"]) for r in rows if (name, r["index"]) in held]
                  for name, rows in by_split.items()}
        threshold, calibration_f1 = choose_threshold(groups)
        calibration = {"fraction": settings.calibration_fraction, "seed": settings.calibration_seed,
                       "solutions": len(held), "mean_f1": calibration_f1}
    for record in records:
        record["part"] = "calibration" if (record["split"], record["index"]) in held else "report"
        record["prediction"] = first_error(record["step_scores"], threshold)
        record["match"] = record["prediction"] == record["label"]
    # the predictions exist only now that the threshold does: every line gains them (a resume rereads the scores)
    atomic_write_text(results_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    out_splits = {}
    for name in split_names:
        reported = [r for r in records if r["split"] == name and r["part"] == "report"]
        entry = split_metrics([r["label"] for r in reported], [r["prediction"] for r in reported])
        entry["calibration_solutions"] = sum(1 for r in records if r["split"] == name and r["part"] == "calibration")
        out_splits[name] = entry
    f1s = [e["f1"] for e in out_splits.values() if e["f1"] is not None]
    summary: dict[str, Any] = {
        "status": "completed", "benchmark": TASK, "version": VERSION, "prm": cfg.eval.prm, "prm_kind": kind,
        "run_dir": str(run_dir.path), "step_separator": settings.step_separator, "threshold": threshold,
        "threshold_source": "given" if calibration is None else "calibrated", "calibration": calibration,
        "splits": out_splits, "average_f1": sum(f1s) / len(f1s) if f1s else None,
    }
    gate = cfg.eval.min_score
    if gate is not None:
        summary["min_score"] = gate
        summary["gate"] = "failed" if (summary["average_f1"] or 0.0) < gate else "passed"
    run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    for name, entry in out_splits.items():
        run_dir.log_metrics({"task": TASK, "split": name, "threshold": threshold, **entry})
    run_dir.finish("completed", summary)
    return summary


def check_gate(summary: dict[str, Any]) -> None:
    if summary.get("gate") == "failed":
        raise GateFailed(f"ProcessBench average F1 {summary['average_f1']} is below --min-score {summary['min_score']}",
                         hint="the eval ran and its results are in the run folder")


def render_table(summary: dict[str, Any]):
    from rich.table import Table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    if summary["threshold_source"] == "given":
        how = "given"
    else:
        how = f"chosen on {summary['calibration']['solutions']} calibration solutions, reported on the rest"
    table = Table(title=f"ProcessBench: {summary['prm']} (threshold {summary['threshold']:.4g}, {how})",
                  title_justify="left")
    for column in ("split", "solutions", "erroneous", "correct", "error acc %", "correct acc %", "F1 %"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, entry in summary["splits"].items():
        table.add_row(name, str(entry["solutions"]), str(entry["erroneous"]), str(entry["correct"]),
                      pct(entry["error_accuracy"]), pct(entry["correct_accuracy"]), pct(entry["f1"]))
    table.add_row("average", "", "", "", "", "", pct(summary["average_f1"]))
    return table
