"""Grader throughput and agreement: mathctl's grader against math-verify on the same cases.

Cases come from the real benchmark answers in ../shared/data/benchmarks (the same readers as
tests/unit/test_grading_benchmarks.py): for a sample of gold answers per benchmark, a response that
states the gold in `\\boxed{}` (should grade correct), one that states a perturbed gold (a digit
changed: should grade wrong), and one that states it in another form where a simple rewrite exists
(`0.5` for `\\frac{1}{2}`, `x=3` for `3`, `3.0` for `3`: should grade correct); plus every pair of
the hand-written table in tests/unit/test_grading_equivalence.py (symbolic and structured answers). Both graders get
the response text and the gold; math-verify parses the gold wrapped in `$\\boxed{...}$`, as NeMo RL
and TRL call it.

Prints cases/s of each (wall clock, one process for math-verify; mathctl with its default worker
pool and with `workers=0`), their agreement, and every disagreement with what the case expects.

    pip install math-verify            # only for this benchmark
    python bench/grader.py             # about a minute
    python bench/grader.py --per-benchmark 100 --json
"""

from __future__ import annotations

import argparse
import json
import random
import re
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
        try:
            gold = parse(f"$\\boxed{{{case['gold']}}}$")
            answer = parse(case["response"])
            verdicts.append(bool(verify(gold, answer)))
        except Exception:  # math-verify raises on some inputs; count as not equal
            verdicts.append(False)
    return verdicts, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-benchmark", type=int, default=60, help="gold answers sampled per benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    parser.add_argument("--max-listed", type=int, default=60, help="disagreements printed")
    args = parser.parse_args()
    try:
        import math_verify  # noqa: F401
    except ImportError:
        print("bench/grader.py needs math-verify: pip install math-verify", file=sys.stderr)
        return 2
    cases = build_cases(args.per_benchmark, args.seed)
    ours, ours_s = run_mathctl(cases, workers=None)
    ours_serial, ours_serial_s = run_mathctl(cases, workers=0)
    theirs, theirs_s = run_math_verify(cases)
    n = len(cases)
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
    if disagreements:
        print(f"\n{len(disagreements)} disagreements (expect = what the case should grade as):")
        for d in disagreements[: args.max_listed]:
            who = "mathctl" if d["mathctl"] == d["expect"] else "math-verify"
            print(f"  [{d['benchmark']}/{d['kind']}] gold={d['gold']!r} answer={d['answer']!r} "
                  f"mathctl={d['mathctl']} math-verify={d['math_verify']} -> {who} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
