"""Grader throughput and agreement: mathctl's grader against math-verify on the same cases.

Cases come from the real benchmark answers in ../shared/data/benchmarks (the same readers as
tests/unit/test_grading_benchmarks.py): for a sample of gold answers per benchmark, a response that
states the gold in `\\boxed{}` (should grade correct), one that states a perturbed gold (a digit
changed: should grade wrong), and one that states it in another form where a simple rewrite exists
(`0.5` for `\\frac{1}{2}`, `x=3` for `3`, `3.0` for `3`: should grade correct); plus every pair of
the hand-written table in tests/unit/test_grading_equivalence.py (symbolic and structured answers). Both graders get
the response text and the gold; math-verify parses the gold wrapped in `$\\boxed{...}$`, as NeMo RL
and TRL call it.

The answer forms of tests/unit/test_grading_forms.py (prose answers, several boxes, labelled answers,
odd golds, with their near misses) are added whole, one category each.

Prints cases/s of each (wall clock, one process for math-verify; mathctl with its default worker
pool and with `workers=0`), the whole-process time of each (a fresh interpreter grading every case:
imports and worker start-up included), their agreement, the share each gets right per category
(benchmark cases by kind, forms by category), and every disagreement with what the case expects.

    pip install math-verify            # only for this benchmark
    python bench/grader.py             # about a minute
    python bench/grader.py --per-benchmark 100 --json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "unit"))
sys.path.insert(0, str(REPO))


def build_cases(per_benchmark: int, seed: int) -> list[dict]:
    from test_grading_benchmarks import BENCHMARKS, GOLD, _first, perturb  # the tests' own readers

    rng = random.Random(seed)
    cases = []
    for name in sorted(GOLD):
        path = BENCHMARKS / name / "test.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rng.shuffle(rows)
        for row in rows[:per_benchmark]:
            gold = _first(GOLD[name](row))
            cases.append({"benchmark": name, "gold": gold, "answer": gold, "expect": True, "kind": "same"})
            changed = perturb(gold)
            if changed is not None and changed != gold:
                cases.append({"benchmark": name, "gold": gold, "answer": changed, "expect": False, "kind": "perturbed"})
            for other in _rewrites(gold):
                cases.append({"benchmark": name, "gold": gold, "answer": other, "expect": True, "kind": "rewritten"})
    # the hand-written table: harder, symbolic and structured pairs
    from test_grading_equivalence import CASES

    for pred, gold, expect in CASES:
        if len(pred) < 300 and len(gold) < 300:  # the table's safety cases (huge inputs) are not grading speed
            cases.append({"benchmark": "table", "gold": gold, "answer": pred, "expect": expect, "kind": "table"})
    for case in cases:
        case["response"] = f"Working through it step by step, so the answer is $\\boxed{{{case['answer']}}}$."
    # the answer forms of tests/unit/test_grading_forms.py: whole responses (prose, several boxes, ...)
    from test_grading_forms import CATEGORIES

    for category, rows in CATEGORIES.items():
        for response, gold, expect in rows:
            cases.append({"benchmark": f"forms/{category}", "gold": gold, "answer": response, "expect": expect,
                          "kind": "forms", "response": response})
    return cases


def _rewrites(gold: str) -> list[str]:
    """Equal answers in another spelling, where one is easy to produce."""
    out = []
    frac = re.fullmatch(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}", gold.strip())
    if frac and int(frac.group(2)) in (2, 4, 5, 8, 10, 20, 25, 50):
        out.append(repr(int(frac.group(1)) / int(frac.group(2))))
    if re.fullmatch(r"-?\d+", gold.strip()):
        out += [f"x = {gold.strip()}", f"{gold.strip()}.0"]
    return out


def run_mathctl(cases: list[dict], workers: int | None) -> tuple[list[bool], float]:
    from mathctl.grading import grade_batch

    start = time.perf_counter()
    grades = grade_batch([c["response"] for c in cases], [c["gold"] for c in cases], workers=workers)
    return [g.correct for g in grades], time.perf_counter() - start


def run_math_verify(cases: list[dict]) -> tuple[list[bool], float]:
    from math_verify import parse, verify

    verdicts = []
    start = time.perf_counter()
    for case in cases:
        golds = case["gold"] if isinstance(case["gold"], list) else [case["gold"]]
        ok = False
        for gold in golds:  # a list of accepted answers: any one
            try:
                ok = bool(verify(parse(f"$\\boxed{{{gold}}}$"), parse(case["response"])))
            except Exception:  # math-verify raises on some inputs; count as not equal
                ok = False
            if ok:
                break
        verdicts.append(ok)
    return verdicts, time.perf_counter() - start


def whole_process_s(grader: str, args: argparse.Namespace) -> float:
    """Wall time of a fresh `python bench/grader.py --only GRADER` over the same cases: interpreter start,
    imports, sympy workers and grading, as a user running one grader would pay."""
    cmd = [sys.executable, __file__, "--only", grader, "--per-benchmark", str(args.per_benchmark),
           "--seed", str(args.seed)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def per_category(cases: list[dict], ours: list[bool], theirs: list[bool]) -> list[dict]:
    rows = {}
    for c, a, b in zip(cases, ours, theirs):
        key = c["benchmark"] if c["kind"] == "forms" else c["kind"]
        r = rows.setdefault(key, {"category": key, "cases": 0, "mathctl_right": 0, "math_verify_right": 0, "agree": 0})
        r["cases"] += 1
        r["mathctl_right"] += a == c["expect"]
        r["math_verify_right"] += b == c["expect"]
        r["agree"] += a == b
    return list(rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-benchmark", type=int, default=60, help="gold answers sampled per benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    parser.add_argument("--max-listed", type=int, default=60, help="disagreements printed")
    parser.add_argument("--only", choices=("mathctl", "math-verify"), help="grade with one grader and exit "
                        "(what the whole-process timing runs)")
    args = parser.parse_args()
    if args.only:
        cases = build_cases(args.per_benchmark, args.seed)
        (run_math_verify(cases) if args.only == "math-verify" else run_mathctl(cases, workers=None))
        return 0
    try:
        import math_verify  # noqa: F401
    except ImportError:
        print("bench/grader.py needs math-verify: pip install math-verify", file=sys.stderr)
        return 2
    cases = build_cases(args.per_benchmark, args.seed)
    ours, ours_s = run_mathctl(cases, workers=None)
    ours_serial, ours_serial_s = run_mathctl(cases, workers=0)
    theirs, theirs_s = run_math_verify(cases)
    ours_process_s, theirs_process_s = whole_process_s("mathctl", args), whole_process_s("math-verify", args)
    n = len(cases)
    realistic = [i for i, c in enumerate(cases) if c["kind"] != "forms"]
    agree = sum(a == b for a, b in zip(ours, theirs))
    disagreements = [
        {**{k: c[k] for k in ("benchmark", "kind", "gold", "answer", "expect")}, "mathctl": a, "math_verify": b}
        for c, a, b in zip(cases, ours, theirs) if a != b
    ]
    result = {
        "cases": n,
        "mathctl_cases_per_s": n / ours_s, "mathctl_one_process_cases_per_s": n / ours_serial_s,
        "math_verify_cases_per_s": n / theirs_s, "speedup": (n / ours_s) / (n / theirs_s),
        "speedup_one_process": (n / ours_serial_s) / (n / theirs_s),
        "agreement": agree / n,
        "mathctl_right": sum(a == c["expect"] for c, a in zip(cases, ours)) / n,
        "math_verify_right": sum(b == c["expect"] for c, b in zip(cases, theirs)) / n,
        "disagreements": len(disagreements),
        "one_process_consistent": ours == ours_serial,
        "mathctl_whole_process_s": ours_process_s, "math_verify_whole_process_s": theirs_process_s,
        "speedup_whole_process": theirs_process_s / ours_process_s,
        "mathctl_right_realistic": sum(ours[i] == cases[i]["expect"] for i in realistic) / max(1, len(realistic)),
        "math_verify_right_realistic": sum(theirs[i] == cases[i]["expect"] for i in realistic) / max(1, len(realistic)),
        "per_category": per_category(cases, ours, theirs),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{n} cases from {len({c['benchmark'] for c in cases})} benchmarks "
          f"({sum(c['kind'] == 'same' for c in cases)} same, {sum(c['kind'] == 'perturbed' for c in cases)} perturbed, "
          f"{sum(c['kind'] == 'rewritten' for c in cases)} rewritten, {sum(c['kind'] == 'table' for c in cases)} table)")
    print(f"mathctl      {result['mathctl_cases_per_s']:10.0f} cases/s   (one process: {result['mathctl_one_process_cases_per_s']:.0f})")
    print(f"math-verify  {result['math_verify_cases_per_s']:10.0f} cases/s")
    print(f"speedup {result['speedup']:.1f}x (one process {result['speedup_one_process']:.1f}x); "
          f"agreement {result['agreement']:.4f}; right per the case's expectation: mathctl "
          f"{result['mathctl_right']:.4f}, math-verify {result['math_verify_right']:.4f}")
    print(f"whole process: mathctl {ours_process_s:.1f} s, math-verify {theirs_process_s:.1f} s "
          f"-> {result['speedup_whole_process']:.1f}x; right on the realistic cases (benchmarks + table): "
          f"mathctl {result['mathctl_right_realistic']:.4f}, math-verify {result['math_verify_right_realistic']:.4f}")
    print(f"\n{'category':<24}{'cases':>6}{'mathctl':>9}{'math-verify':>12}{'agree':>7}")
    for r in result["per_category"]:
        k = r["cases"]
        print(f"{r['category']:<24}{k:>6}{r['mathctl_right'] / k:>9.3f}{r['math_verify_right'] / k:>12.3f}"
              f"{r['agree'] / k:>7.3f}")
    if disagreements:
        print(f"\n{len(disagreements)} disagreements (expect = what the case should grade as):")
        for d in disagreements[: args.max_listed]:
            who = "mathctl" if d["mathctl"] == d["expect"] else "math-verify"
            print(f"  [{d['benchmark']}/{d['kind']}] gold={d['gold']!r} answer={d['answer']!r} "
                  f"mathctl={d['mathctl']} math-verify={d['math_verify']} -> {who} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
