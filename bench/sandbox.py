"""Sandbox throughput: executions per second of mathctl.sandbox against plain in-process `exec`.

Rows (wall clock, after one warm-up run that starts the worker process):
    run            sequential `Sandbox.run` of a tiny snippet, N times
    run_many       `Sandbox.run_many(..., workers=2)` of the same snippet, 2N times
    sympy          sequential runs of a small sympy snippet (sympy preloaded in the workers: the default)
    sympy cold     the same with `preload = ()`: every run imports sympy itself
    exec           in-process `exec` of the tiny snippet in a fresh dict (what rStar-Math does: no isolation)

    python bench/sandbox.py            # about 10 s
    python bench/sandbox.py --n 500 --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = "x = sum(i * i for i in range(100))\nprint(x)"
SYMPY = "from sympy import symbols, solve\nx = symbols('x')\nsolve(x**2 - 5*x + 6, x)"


def per_second(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="sequential runs (run_many does 2N)")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    args = parser.parse_args()
    from mathctl.sandbox import Sandbox

    n = args.n
    result: dict[str, float] = {"n": n, "cpu_count": os.cpu_count() or 1}
    with Sandbox() as box:
        start = time.perf_counter()
        first = box.run(TINY)
        result["first_run_s"] = time.perf_counter() - start  # starts a worker (imports sympy)
        assert first.output == "328350\n", first
        result["isolation"] = getattr(box, "isolation", None)  # what the kernel enforced (None before confine.py)
        result["run_per_s"] = per_second(lambda: [box.run(TINY) for _ in range(n)], n)
        box.run_many([TINY, TINY], workers=2)  # warm the second worker
        outputs: list = []
        result["run_many_per_s"] = per_second(lambda: outputs.extend(box.run_many([TINY] * 2 * n, workers=2)), 2 * n)
        assert all(r.output == "328350\n" for r in outputs)
        small = max(n // 5, 2)
        result["sympy_per_s"] = per_second(lambda: [box.run(SYMPY) for _ in range(small)], small)
    with Sandbox() as cold:
        cold.preload = ()
        cold.run("1")
        small_cold = max(n // 20, 2)
        result["sympy_cold_per_s"] = per_second(lambda: [cold.run(SYMPY) for _ in range(small_cold)], small_cold)
    code = compile(TINY, "<code>", "exec")
    repeats = 100 * n
    with redirect_stdout(io.StringIO()):
        result["exec_per_s"] = per_second(lambda: [exec(code, {"__name__": "__main__"}) for _ in range(repeats)],
                                          repeats)
    result["exec_over_run"] = result["exec_per_s"] / result["run_per_s"]
    result["exec_over_run_many"] = result["exec_per_s"] / result["run_many_per_s"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"sandbox on {result['cpu_count']} CPU cores; first run (worker start, sympy import) "
          f"{result['first_run_s']:.2f} s; isolation {result['isolation']}")
    print(f"run            {result['run_per_s']:10.0f} executions/s   (tiny snippet, sequential, N={n})")
    print(f"run_many       {result['run_many_per_s']:10.0f} executions/s   (tiny snippet, 2 workers, N={2 * n})")
    print(f"sympy          {result['sympy_per_s']:10.0f} executions/s   (solve a quadratic, sympy preloaded, "
          f"N={small})")
    print(f"sympy cold     {result['sympy_cold_per_s']:10.1f} executions/s   (same, each run imports sympy, "
          f"N={small_cold})")
    print(f"exec           {result['exec_per_s']:10.0f} executions/s   (in-process, no isolation, N={repeats})")
    print(f"in-process exec is {result['exec_over_run']:.0f}x faster than run, "
          f"{result['exec_over_run_many']:.0f}x faster than run_many")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
