"""Eval metrics against hand-computed values, the task table, and per-task settings."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest

from mathctl.benchmarks import (
    BENCHMARKS,
    CHOICE_PROMPT,
    MIXED_PROMPT,
    get_benchmark,
    load_problems,
    read_answer,
    render_options,
    render_prompt,
)
from mathctl.core.errors import ConfigError, DataError
from mathctl.evaluate import (
    EvalConfig,
    best_of_correct,
    default_ks,
    majority_correct,
    parse_shard,
    pass_at_k,
    read_results,
    summarize,
    task_sampling,
)
from mathctl.grading import Choice

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

BENCH_DIR = SHARED_DATA / "benchmarks"


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(16, 3, 8) == pytest.approx(1 - comb(13, 8) / comb(16, 8))
    assert pass_at_k(3, 2, 2) == 1.0  # fewer wrong samples than k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_votes_on_equivalence_not_spelling():
    # `1/2` and `0.5` are one wrong answer with two votes; they beat the one right answer
    assert majority_correct(["\\frac{1}{2}", "0.5", "3"], [False, False, True]) is False
    # two spellings of the right answer are one class
    assert majority_correct(["7", "\\frac{1}{2}", "7.0", "0.6"], [True, False, True, False]) is True
    # wrong answers that differ stay separate votes: the right one, reached first, wins the tie
    assert majority_correct(["3", "1", "2", "3"], [True, False, False, True]) is True
    assert majority_correct(["1", "2", "3", "1"], [False, False, True, False]) is False


def test_majority_vote_and_ties():
    assert majority_correct(["4", "5", "4"], [True, False, True]) is True
    assert majority_correct(["5", "4", "5"], [False, True, False]) is False
    # tie 1-1: the answer reached first wins
    assert majority_correct(["4", "5"], [True, False]) is True
    assert majority_correct(["5", "4"], [False, True]) is False
    # tie 2-2 after a lone answer: "7" appears before "4"
    assert majority_correct(["9", "7", "4", "7", "4"], [False, False, True, False, True]) is False
    # no answer does not vote; all missing is wrong
    assert majority_correct([None, None, "4"], [False, False, True]) is True
    assert majority_correct([None, ""], [False, False]) is False


def test_best_of_n():
    assert best_of_correct([0.1, 0.9, 0.3], [False, True, False]) is True
    assert best_of_correct([0.5, 0.5], [False, True]) is False  # tie: the earliest


def _record(index, answers, gold_answer, tokens=10, seconds=1.0, finish="stop", scores=None):
    samples = []
    for i, a in enumerate(answers):
        s = {"normalized": a, "extracted": a, "correct": a == gold_answer, "num_tokens": tokens, "finish_reason": finish}
        if scores:
            s["score"] = scores[i]
        samples.append(s)
    return {"task": "t", "index": index, "samples": samples, "seconds": seconds}


def test_summarize_hand_computed():
    records = [
        _record(0, ["1", "1", "2", "1"], "1"),       # c=3
        _record(1, ["2", "3", "3", None], "2"),      # c=1, majority "3" wrong
        _record(2, [None, None, None, None], "5", finish="length"),  # c=0
    ]
    s = summarize(records)
    assert s["n"] == 4 and s["problems"] == 3
    assert s["score"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert s["avg@4"] == s["score"] and "accuracy" not in s
    assert list(s["pass@k"]) == ["1", "2", "4"]
    assert s["pass@k"]["1"] == pytest.approx(s["score"])
    assert s["pass@k"]["2"] == pytest.approx((pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2) + 0) / 3)
    assert s["pass@k"]["4"] == pytest.approx(2 / 3)
    # maj@1: first sample; maj@2: "2" vs "3" tie -> "2" first -> right for record 1
    assert s["maj@k"]["1"] == pytest.approx(2 / 3)
    assert s["maj@k"]["2"] == pytest.approx(2 / 3)
    assert s["maj@k"]["4"] == pytest.approx(1 / 3)
    assert s["truncated"] == 4 and s["no_answer"] == 5
    assert s["generated_tokens"] == 120 and s["correct_samples"] == 4
    assert s["tokens_per_second"] == pytest.approx(40.0)
    assert "bon@k" not in s


def test_summarize_greedy_and_best_of():
    s = summarize([_record(0, ["1"], "1"), _record(1, ["2"], "3")])
    assert s["accuracy"] == 0.5 and s["pass@k"] == {"1": 0.5}
    scored = summarize([_record(0, ["1", "2"], "2", scores=[0.2, 0.8]), _record(1, ["1", "2"], "1", scores=[0.1, 0.3])])
    assert scored["bon@k"] == {"1": 0.5, "2": 0.5}


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(6) == [1, 2, 4, 6]


def test_shard_spec():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "a/b", "1", "0/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    with pytest.raises(Exception, match="i/N"):
        EvalConfig.model_validate({"model": {"path": "x"}, "eval": {"shard": "1-2"}})


def test_task_names_aliases_and_unknown():
    assert get_benchmark("aime24").name == "aime2024"
    assert get_benchmark("AIME2024").name == "aime2024"
    assert get_benchmark("aime25").name == "aime2025"
    assert get_benchmark("gaokao2024_i").name == get_benchmark("GAOKAO2024_I").name == "gaokao2024_I"
    with pytest.raises(ConfigError) as err:
        get_benchmark("aime2023")
    assert "available" in err.value.hint and "math500" in err.value.hint
    with pytest.raises(Exception, match="unknown eval task 'gsm9k'"):
        EvalConfig.model_validate({"model": {"path": "x"}, "eval": {"tasks": ["gsm9k"]}})


def test_task_sampling_precedence():
    cfg = EvalConfig.model_validate({"model": {"path": "x"}, "eval": {
        "tasks": ["math500", "aime24"], "max_new_tokens": 512, "per_task": {"aime2024": {"n": 4, "prompt": "Q: {problem}"}}}})
    math500, prompt = task_sampling(cfg, "math500")
    assert (math500.n, math500.temperature, math500.max_new_tokens) == (1, 0.0, 512)
    assert prompt.startswith("{problem}\nLet's think step by step") and prompt.endswith("\\boxed{}.")
    aime, aime_prompt = task_sampling(cfg, "aime2024")
    assert (aime.n, aime.temperature, aime.top_p, aime.max_new_tokens) == (4, 0.6, 0.95, 512)
    assert aime_prompt == "Q: {problem}"
    amc, _ = task_sampling(cfg, "amc23")
    assert (amc.n, amc.temperature, amc.top_p) == (16, 0.6, 0.95)


def test_render_prompt_keeps_latex_braces():
    assert render_prompt("{problem} in \\boxed{}", "1+1") == "1+1 in \\boxed{}"
    with pytest.raises(ConfigError, match="placeholder"):
        render_prompt("no placeholder", "x")


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_task_reads_its_local_file(name):
    bench = BENCHMARKS[name]
    if not (BENCH_DIR / bench.local / "test.jsonl").is_file():
        pytest.skip("../shared/data/benchmarks is beside the checkout in CI")
    problems = load_problems(bench, BENCH_DIR)
    expected = sum(1 for _ in open(BENCH_DIR / bench.local / "test.jsonl", encoding="utf-8"))
    assert len(problems) == expected
    with_gold = [p for p in problems if p.gold is not None]
    assert len(with_gold) >= expected - 11  # omni-math 9 and gaokao2023en 2 empty answers in the sources
    assert all(p.problem.strip() for p in problems)
    assert [p.index for p in problems] == list(range(expected))


def test_gold_readers():
    gsm = get_benchmark("gsm8k")
    assert read_answer(gsm, {"answer": "work\n#### 2,125"}) == "2,125"
    minerva = get_benchmark("minerva_math")
    assert read_answer(minerva, {"solution": "so \\boxed{1} then \\boxed{\\frac{1}{2}}"}) == "\\frac{1}{2}"
    assert read_answer(minerva, {"answer": "7", "solution": "\\boxed{8}"}) == "7"  # hub copies have `answer`
    math = get_benchmark("math")
    assert read_answer(math, {"solution": "\\boxed{3}"}) == "3"


def test_choice_gold_reader():
    mmlu, mix, gaokao = get_benchmark("mmlu_stem"), get_benchmark("gaokao2024_mix"), get_benchmark("gaokao2024_I")
    assert read_answer(mmlu, {"answer": 2}) == "C" and isinstance(read_answer(mmlu, {"answer": 2}), Choice)
    assert read_answer(mmlu, {"answer": 0}) == "A"
    with pytest.raises(DataError, match="out of range"):
        read_answer(mmlu, {"answer": 7})
    assert isinstance(read_answer(mix, {"choice_answer": "C", "answer": "C. 1-i"}), Choice)
    fill_in = read_answer(mix, {"choice_answer": "", "answer": "\\frac{4}{5}"})  # no choice: the value
    assert fill_in == "\\frac{4}{5}" and not isinstance(fill_in, Choice)
    assert read_answer(gaokao, {"answer": "ACD", "type": "multi"}) == "ACD"
    assert not isinstance(read_answer(gaokao, {"answer": "ln2", "type": "blank"}), Choice)


def test_gaokao2024_choice_golds_are_its_choice_questions():
    for name in ("gaokao2024_I", "gaokao2024_II"):
        if not (BENCH_DIR / name / "test.jsonl").is_file():
            pytest.skip("../shared/data/benchmarks is beside the checkout in CI")
        rows = [json.loads(line) for line in open(BENCH_DIR / name / "test.jsonl", encoding="utf-8")]
        golds = [p.gold for p in load_problems(get_benchmark(name), BENCH_DIR)]
        assert [isinstance(g, Choice) for g in golds] == [row["type"] in ("single", "multi") for row in rows]


def test_options_are_shown_labelled():
    assert render_options(["12", " 15 ", "x"]) == "(A) 12\n(B) 15\n(C) x"
    assert render_options("A) 12 B) $f(6)=-6$ C) 18 D) 10 and 20") == "(A) 12\n(B) $f(6)=-6$\n(C) 18\n(D) 10 and 20"
    assert render_options("A. 1,190 B. 1,900 C. 2,900 D. 19,000") == "(A) 1,190\n(B) 1,900\n(C) 2,900\n(D) 19,000"
    # a letter inside an option is not a label unless it follows a space and has its `)` or `.` and a space
    assert render_options("A) data set $B$ B) set B C) none") == "(A) data set $B$\n(B) set B\n(C) none"
    assert render_options("no labels here") == "no labels here"
    mmlu = get_benchmark("mmlu_stem")
    row = {"question": "Which is prime?", "subject": "college_mathematics", "choices": ["4", "6", "7", "9"], "answer": 2}
    problem = load_problems(mmlu, None, hub_loader=lambda b: [row])
    assert problem[0].problem == "Which is prime?\n(A) 4\n(B) 6\n(C) 7\n(D) 9"


def test_every_sat_math_question_shows_four_labelled_options():
    if not (BENCH_DIR / "sat_math" / "test.jsonl").is_file():
        pytest.skip("../shared/data/benchmarks is beside the checkout in CI")
    for problem in load_problems(get_benchmark("sat_math"), BENCH_DIR):
        lines = problem.problem.splitlines()[-4:]
        assert [line[:4] for line in lines] == ["(A) ", "(B) ", "(C) ", "(D) "], problem.problem


def test_choice_tasks_ask_for_the_letter():
    assert get_benchmark("mmlu_stem").prompt == get_benchmark("sat_math").prompt == CHOICE_PROMPT
    assert all(get_benchmark(n).prompt == MIXED_PROMPT
               for n in ("gaokao2024_I", "gaokao2024_II", "gaokao2024_mix", "cn_middle_school"))
    assert "letter of the correct option within \\boxed{}" in CHOICE_PROMPT


def test_mmlu_stem_from_the_hub_keeps_its_stem_subjects():
    rows = [{"question": "q1", "subject": "college_physics", "choices": ["a", "b"], "answer": 1},
            {"question": "q2", "subject": "world_religions", "choices": ["a", "b"], "answer": 0}]
    problems = load_problems(get_benchmark("mmlu_stem"), None, hub_loader=lambda b: rows)
    kept = [(p.problem.splitlines()[0], p.gold, p.extra) for p in problems]
    assert kept == [("q1", "B", {"subject": "college_physics"})]


def test_a_task_without_a_hub_copy_asks_for_the_data_dir():
    with pytest.raises(DataError) as err:
        load_problems(get_benchmark("sat_math"), None, hub_loader=lambda b: pytest.fail("no hub copy to load"))
    assert "no hub copy" in err.value.message and "--data-dir" in err.value.hint


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_problems(get_benchmark("math500"), tmp_path)
    assert "math500/test.jsonl" in str(err.value)


def test_read_results_drops_a_cut_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"task": "a", "index": 0}\n{"task": "a", "index": 1}\n{"task": "a", "ind')
    assert [r["index"] for r in read_results(path)] == [0, 1]
    assert path.read_text().endswith('"ind')  # untouched without repair
    read_results(path, repair=True)
    assert path.read_text() == '{"task": "a", "index": 0}\n{"task": "a", "index": 1}\n'
    path.write_text('{"task": "a", "index": 0}')  # complete, but its newline was cut
    assert len(read_results(path, repair=True)) == 1 and path.read_text().endswith("}\n")
    path.write_text('{"task": "a", "index": 0}\nnot json\n{"task": "a", "index": 2}\n')
    with pytest.raises(DataError, match="line 2"):
        read_results(path)
