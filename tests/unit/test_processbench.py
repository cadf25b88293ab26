"""ProcessBench: the metric against hand-computed values, the threshold choice against brute force, the
calibration draw, record checks, and a whole run with a stand-in scorer (resume included)."""

from __future__ import annotations

import json
import math
import random

import pytest

from mathctl.core.errors import ConfigError, DataError
from mathctl.evaluate import EvalConfig
from mathctl.processbench import (
    ProcessBenchSettings,
    check_record,
    choose_threshold,
    first_error,
    harmonic_mean,
    load_splits,
    match_interval,
    read_split_file,
    score_text_steps,
    select_calibration,
    split_metrics,
)


def record(label: int, steps: int = 3, **extra) -> dict:
    return {"id": extra.pop("id", "x"), "generator": "g", "problem": "What is 1 + 1?",
            "steps": [f"step {k}" for k in range(steps)], "final_answer_correct": label == -1, "label": label, **extra}


# --- metric -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scores, threshold, expected", [
    ([0.9, 0.8, 0.7], 0.5, -1),  # no step below: no error predicted
    ([0.9, 0.4, 0.1], 0.5, 1),  # the first step below, not the lowest
    ([0.2, 0.9], 0.5, 0),
    ([0.5, 0.5], 0.5, -1),  # "below" is strict
    ([-3.0, -2.0], -2.5, 0),  # PPM logits: any scale
])
def test_first_error(scores, threshold, expected):
    assert first_error(scores, threshold) == expected


def test_split_metrics_on_a_toy_set_by_hand():
    # erroneous: labels 1, 0, 2 predicted 1, -1, 2 -> 2 of 3; correct: predicted -1, 0 -> 1 of 2
    metrics = split_metrics([1, 0, 2, -1, -1], [1, -1, 2, -1, 0])
    assert metrics["erroneous"] == 3 and metrics["correct"] == 2 and metrics["solutions"] == 5
    assert metrics["error_accuracy"] == pytest.approx(2 / 3)
    assert metrics["correct_accuracy"] == pytest.approx(1 / 2)
    assert metrics["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)


def test_a_late_or_early_prediction_is_wrong_and_f1_edges():
    assert split_metrics([2, 2], [1, 3])["error_accuracy"] == 0.0  # the step must be the labelled one exactly
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 0.0) == 0.0
    assert harmonic_mean(None, 1.0) is None
    only_correct = split_metrics([-1, -1], [-1, 0])
    assert only_correct["error_accuracy"] is None and only_correct["f1"] is None


def test_match_interval_is_exactly_where_the_label_is_predicted():
    rng = random.Random(0)
    for _ in range(300):
        scores = [round(rng.uniform(-2, 2), 1) for _ in range(rng.randint(1, 5))]  # ties on purpose
        label = rng.randint(-1, len(scores) - 1)
        lo, hi = match_interval(scores, label)
        for t in [v + d for v in scores for d in (-0.05, 0.0, 0.05)] + [-9.0, 9.0]:
            assert (first_error(scores, t) == label) == (lo < t <= hi), (scores, label, t)


# --- threshold choice ---------------------------------------------------------------------------


def _mean_f1(groups, t):
    f1s = [split_metrics([y for _, y in pairs], [first_error(s, t) for s, _ in pairs])["f1"] for pairs in groups.values()]
    f1s = [f for f in f1s if f is not None]
    return sum(f1s) / len(f1s)


def test_choose_threshold_by_hand():
    # the wrong step scores low, right steps high: any threshold between 0.3 and 0.6 is perfect
    groups = {"a": [([0.9, 0.3, 0.8], 1), ([0.7, 0.6], -1), ([0.2, 0.9], 0)]}
    threshold, best = choose_threshold(groups)
    assert best == 1.0
    assert 0.3 < threshold <= 0.6
    assert threshold == pytest.approx(0.45)  # the midpoint of the gap between 0.3 and 0.6


def test_choose_threshold_matches_brute_force_over_splits():
    rng = random.Random(3)
    for _ in range(40):
        groups = {}
        for name in ("a", "b"):
            pairs = []
            for _ in range(rng.randint(2, 7)):
                scores = [round(rng.gauss(0, 1), 2) for _ in range(rng.randint(1, 4))]
                pairs.append((scores, rng.randint(-1, len(scores) - 1)))
            pairs += [([0.5], -1), ([0.1, -0.5], 1)]  # both classes present
            groups[name] = pairs
        threshold, best = choose_threshold(groups)
        assert _mean_f1(groups, threshold) == pytest.approx(best)
        grid = sorted({v + d for pairs in groups.values() for s, _ in pairs for v in s for d in (-1e-3, 0, 1e-3)})
        assert best >= max(_mean_f1(groups, t) for t in grid) - 1e-12


def test_choose_threshold_needs_both_classes_somewhere():
    with pytest.raises(ConfigError, match="calibration"):
        choose_threshold({"a": [([0.1], -1)], "b": [([0.1, 0.2], 1)]})
    # a group with one class only does not count; the others decide
    threshold, best = choose_threshold({"a": [([0.1], -1)], "b": [([0.9, 0.2], 1), ([0.8, 0.7], -1)]})
    assert best == 1.0 and 0.2 < threshold <= 0.7


def test_calibration_draw_is_stratified_and_seeded():
    splits = {"gsm8k": [record(-1 if k % 4 == 0 else 1) | {"index": k} for k in range(40)],
              "math": [record(-1) | {"index": 0}, record(2) | {"index": 1}, record(-1) | {"index": 2}]}
    held = select_calibration(splits, 0.1, seed=0)
    gsm = [i for s, i in held if s == "gsm8k"]
    assert sum(1 for i in gsm if i % 4 == 0) == 1 and sum(1 for i in gsm if i % 4) == 3  # round(0.1 x 10), round(0.1 x 30)
    assert [i for s, i in held if s == "math"] in ([0], [2])  # 2 correct: one each way; 1 erroneous: kept for the report
    assert select_calibration(splits, 0.1, seed=0) == held
    assert select_calibration(splits, 0.1, seed=1) != held


def test_steps_end_with_the_separator_once():
    assert score_text_steps(["a", "b\n", "c "], "\n") == ["a\n", "b\n", "c \n"]
    assert score_text_steps(["a"], "") == ["a"]


# --- records ------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"problem": "p", "steps": ["a"]}, "no field 'label'"),
    ({"problem": "p", "steps": [], "label": -1}, "non-empty list"),
    ({"problem": "p", "steps": "a", "label": -1}, "non-empty list"),
    ({"problem": "p", "steps": ["a", ""], "label": -1}, "non-empty list"),
    ({"problem": "", "steps": ["a"], "label": -1}, "'problem'"),
    ({"problem": "p", "steps": ["a"], "label": 1}, "label 1 is not -1 or a step index 0..0"),
    ({"problem": "p", "steps": ["a"], "label": True}, "label True"),
    ({"problem": "p", "steps": ["a"], "label": "0"}, "label '0'"),
    (["p"], "expected a JSON object"),
])
def test_bad_records_name_the_record(row, message):
    with pytest.raises(DataError, match="f.json record 3") as err:
        check_record(row, "f.json record 3")
    assert message in str(err.value) and err.value.hint


def test_split_files_and_their_errors(tmp_path):
    folder = tmp_path / "processbench"
    folder.mkdir()
    (folder / "gsm8k.json").write_text(json.dumps([record(1, id="gsm8k-0"), record(-1, id="gsm8k-1")]))
    (folder / "math.json").write_text(json.dumps({"not": "a list"}))
    (folder / "omnimath.json").write_text('[{"problem": "p",')
    (folder / "olympiadbench.json").write_text(json.dumps([record(-1), record(5, id="olympiadbench-1")]))
    settings = ProcessBenchSettings(splits=["gsm8k"])
    records = load_splits(settings, tmp_path)["gsm8k"]
    assert [r["index"] for r in records] == [0, 1] and records[0]["label"] == 1 and records[1]["id"] == "gsm8k-1"
    assert [r["index"] for r in load_splits(settings, tmp_path, limit=1)["gsm8k"]] == [0]
    with pytest.raises(DataError, match="expected a JSON list"):
        read_split_file(folder / "math.json")
    with pytest.raises(DataError, match="malformed JSON"):
        read_split_file(folder / "omnimath.json")
    with pytest.raises(DataError, match=r"record 2 \(id olympiadbench-1\): label 5"):
        read_split_file(folder / "olympiadbench.json")
    with pytest.raises(DataError, match="does not exist") as err:
        load_splits(ProcessBenchSettings(splits=["gsm8k", "math"]), tmp_path / "elsewhere")
    assert "eval.processbench.splits" in err.value.hint


def test_limit_spreads_through_the_file():
    from mathctl.processbench import spread

    assert spread(10, 5) == [0, 2, 4, 6, 8]
    assert spread(7, 3) == [0, 2, 4]
    assert spread(4, None) == spread(4, 9) == [0, 1, 2, 3]


def test_without_a_data_folder_the_hub_loader_is_asked():
    asked = []

    def hub(split):
        asked.append(split)
        return [check_record(record(-1), "hub")]

    out = load_splits(ProcessBenchSettings(splits=["math", "omnimath"]), None, hub_loader=hub)
    assert asked == ["math", "omnimath"] and set(out) == {"math", "omnimath"}


# --- config -------------------------------------------------------------------------------------


def test_config_needs_a_prm_not_a_model_and_refuses_generation_keys():
    cfg = EvalConfig.model_validate({"eval": {"tasks": ["ProcessBench"], "prm": "p"}})
    assert cfg.model is None and cfg.eval.processbench.threshold is None
    for bad, message in [({"tasks": ["processbench"]}, "eval.prm"),
                         ({"tasks": ["processbench", "gsm8k"], "prm": "p"}, "runs alone"),
                         ({"tasks": ["processbench"], "prm": "p", "n": 4}, "eval.n"),
                         ({"tasks": ["processbench"], "prm": "p", "shard": "0/2"}, "eval.shard"),
                         ({"tasks": ["gsm8k"]}, "needs a model")]:
        with pytest.raises(ValueError, match=message):
            EvalConfig.model_validate({"eval": bad})
    with pytest.raises(ValueError, match="listed twice"):
        ProcessBenchSettings(splits=["math", "math"])


# --- a whole run with a stand-in scorer ------------------------------------------------------------


def _write_data(root, splits):
    folder = root / "processbench"
    folder.mkdir(parents=True)
    for name, rows in splits.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))


def _step_scorer(calls):
    """Scores a step 0.1 when its text says `bad`, else 0.9; counts the solutions it is asked about."""

    def score(items):
        calls.append(len(items))
        for _, steps in items:
            assert all(s.endswith("\n") for s in steps)  # the separator was appended
        return [[0.1 if "bad" in s else 0.9 for s in steps] for _, steps in items]

    return score


def test_run_with_a_given_threshold_and_resume(tmp_path):
    from mathctl.core.rundir import RunDir
    from mathctl.processbench import run

    good = {"problem": "p", "steps": ["ok", "ok"], "label": -1}
    splits = {
        # erroneous: found (label 1), too late (label 0, flagged at 1); correct: clean, and one false alarm
        "gsm8k": [{"problem": "p", "steps": ["ok", "bad"], "label": 1},
                  {"problem": "p", "steps": ["ok", "bad"], "label": 0}, good,
                  {"problem": "p", "steps": ["bad", "ok"], "label": -1}],
        "math": [{"problem": "p", "steps": ["bad"], "label": 0}, good],
    }
    _write_data(tmp_path / "data", splits)
    cfg = EvalConfig.model_validate({"eval": {"tasks": ["processbench"], "prm": "unused", "chunk_problems": 2,
                                              "data_dir": str(tmp_path / "data"), "processbench": {
                                                  "splits": ["gsm8k", "math"], "threshold": 0.5}}})
    calls = []
    run_dir = RunDir.create(tmp_path / "r", recipe_yaml="x", step="eval", resume=False, seeds={})
    summary = run(cfg, run_dir, scorer=_step_scorer(calls))
    assert calls == [2, 2, 2]  # 6 solutions in chunks of 2
    gsm, math_ = summary["splits"]["gsm8k"], summary["splits"]["math"]
    assert gsm["error_accuracy"] == 0.5 and gsm["correct_accuracy"] == 0.5 and gsm["f1"] == 0.5
    assert math_["f1"] == 1.0 and summary["average_f1"] == 0.75
    assert summary["threshold"] == 0.5 and summary["threshold_source"] == "given" and summary["calibration"] is None
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [(r["split"], r["index"], r["prediction"], r["match"]) for r in rows][:2] == [
        ("gsm8k", 0, 1, True), ("gsm8k", 1, 1, False)]
    assert all(r["part"] == "report" and r["step_scores"] for r in rows)

    # a kill after four solutions: the resumed run scores only the last two, with the same result
    path = tmp_path / "r" / "results.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:4]) + '{"split": "ma')
    calls.clear()
    again = run(cfg, RunDir.create(tmp_path / "r", recipe_yaml="x", step="eval", resume=True, seeds={}),
                scorer=_step_scorer(calls))
    assert calls == [2]
    assert again["splits"] == summary["splits"] and again["average_f1"] == summary["average_f1"]


def test_run_chooses_the_threshold_on_the_calibration_part(tmp_path):
    from mathctl.core.rundir import RunDir
    from mathctl.processbench import run

    rng = random.Random(0)
    rows = []
    for k in range(60):  # a perfect judge: bad steps score 0.1, others 0.9
        n = rng.randint(1, 4)
        label = -1 if k % 2 else rng.randint(0, n - 1)
        steps = ["ok"] * n if label == -1 else ["ok"] * label + ["bad"] + ["ok"] * (n - label - 1)
        rows.append({"problem": "p", "steps": steps, "label": label})
    _write_data(tmp_path / "data", {"gsm8k": rows})
    cfg = EvalConfig.model_validate({"eval": {"tasks": ["processbench"], "prm": "unused",
                                              "data_dir": str(tmp_path / "data"), "processbench": {
                                                  "splits": ["gsm8k"], "calibration_fraction": 0.2}}})
    summary = run(cfg, RunDir.create(tmp_path / "r", recipe_yaml="x", step="eval", resume=False, seeds={}),
                  scorer=_step_scorer([]))
    assert summary["threshold_source"] == "calibrated" and 0.1 < summary["threshold"] <= 0.9
    assert summary["calibration"] == {"fraction": 0.2, "seed": 0, "solutions": 12, "mean_f1": 1.0}
    entry = summary["splits"]["gsm8k"]
    assert entry["solutions"] == 48 and entry["calibration_solutions"] == 12 and entry["f1"] == 1.0
    results = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert sum(r["part"] == "calibration" for r in results) == 12 and len(results) == 60
    assert not math.isnan(summary["average_f1"])
