"""`mathctl.grading.equivalence`: a table of equal and unequal answer pairs, and the safety promises
(time limit, deep nesting, huge powers, threads, worker processes, clean-up)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import pytest

from mathctl.grading import equivalence as E
from mathctl.grading.equivalence import equivalent, equivalent_many

PM = "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"

# (pred, gold, expected). A comment says why when the case is not obvious.
CASES: list[tuple[str, str, bool]] = [
    # --- integers, decimals, fractions
    ("42", "42", True),
    ("42", "43", False),
    ("$42$", " 42 ", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac12", "0.5", True),  # TeX shorthand: one digit per argument
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("1/3", "\\frac{1}{3}", True),
    ("0.333", "\\frac{1}{3}", False),  # off by 1e-3 relative: outside the default 1e-4
    ("0.33333", "\\frac{1}{3}", True),  # off by 1e-5 relative: a decimal approximation is accepted
    ("\\frac{1}{10000}", "\\frac{1}{10001}", False),  # no decimal written: fractions compare exactly
    ("3.0", "3", True),
    ("2.9999", "3", False),  # integers never get a tolerance
    ("1000001", "1000000", False),  # would pass a pure 1e-4 relative tolerance
    ("123456789012345678901", "123456789012345678902", False),  # big integers stay exact
    ("-3", "-3.0", True),
    ("-5", "5", False),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", True),
    ("1.5e3", "1500", True),
    ("1.5\\times10^{3}", "1500", True),
    ("2.5\\cdot 10^{-3}", "0.0025", True),
    ("1,234", "1234", True),  # thousands separator, not a list
    ("\\$5", "5", True),
    ("50\\%", "50", True),
    ("50\\%", "0.5", False),  # policy: % is dropped, not divided by 100
    ("30^\\circ", "30", True),
    ("5\\text{ cm}", "5", True),  # unit word after a number
    ("5\\text{ cm}^2", "5", True),
    ("2\\frac{1}{2}", "\\frac{5}{2}", True),  # mixed number
    ("0", "-0", True),
    # --- roots
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("3\\sqrt{2}", "\\sqrt{18}", True),
    ("\\sqrt2/2", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt[3]{27}", "3", True),
    ("\\sqrt[3]{-8}", "-2", True),  # odd root of a negative number is real
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("1.41421", "\\sqrt{2}", True),  # decimal approximation within 1e-4
    ("1.41", "\\sqrt{2}", False),
    ("\\frac{99}{70}", "\\sqrt{2}", False),  # agrees to 5e-5 but no decimal was written: exact forms must match
    ("\\sqrt{-4}", "2i", True),
    # --- pi, e, logs, exponents
    ("2\\pi", "\\pi\\cdot2", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("3.1416", "\\pi", True),
    ("3.14", "\\pi", False),  # 5e-4 relative
    ("\\frac{22}{7}", "\\pi", False),
    ("2^{10}", "1024", True),
    ("2^10", "1024", True),  # plain-text intent, not TeX's 2^1 0
    ("2**10", "1024", True),
    ("10^{-2}", "0.01", True),
    ("2^{-1}", "\\frac12", True),
    ("e^{i\\pi}", "-1", True),
    ("\\log_2 8", "3", True),
    ("\\ln(e^3)", "3", True),
    ("5!", "120", True),
    ("\\binom{5}{2}", "10", True),
    ("\\sin\\frac{\\pi}{6}", "\\frac12", True),
    ("\\cos 0", "1", True),
    ("|-3|", "3", True),
    ("\\lfloor 2.7 \\rfloor", "2", True),
    # --- expressions in variables
    ("x^2-1", "(x-1)(x+1)", True),
    ("x+1", "x-1", False),
    ("\\frac{x^2-1}{x-1}", "x+1", True),  # equal as rational functions (sympy agrees)
    ("2x", "x\\cdot2", True),
    ("\\frac{1}{2}x", "\\frac{x}{2}", True),
    ("x(x+1)", "x^2+x", True),
    ("(a+b)^2", "a^2+2ab+b^2", True),
    ("(a+b)^2", "a^2+b^2", False),
    ("x", "X", False),  # variables are case-sensitive
    ("\\frac{1}{x}+\\frac{1}{y}", "\\frac{x+y}{xy}", True),
    ("2\\pi r", "2r\\pi", True),
    ("x_1+x_2", "x_2+x_1", True),
    ("\\alpha+\\beta", "\\beta+\\alpha", True),
    ("\\sin(2x)", "2\\sin x\\cos x", True),  # needs sympy
    ("\\sin^2 x+\\cos^2 x", "1", True),
    ("e^{x}e^{x}", "e^{2x}", True),
    ("\\sqrt{x^2}", "|x|", True),
    ("\\sqrt{x^2}", "x", False),  # differs for x < 0
    ("\\sin x", "\\cos x", False),
    ("3+4i", "4i+3", True),
    ("(1+i)^2", "2i", True),
    # --- equations and inequalities
    ("y=2x+1", "2x+1=y", True),
    ("2y=4x+2", "y=2x+1", True),  # lhs-rhs differ by a nonzero constant factor
    ("y=2x+1", "y=2x-1", False),
    ("x^2+y^2=1", "y^2+x^2=1", True),
    ("x^2+y^2=1", "x^2+y^2=2", False),
    ("x=3", "3", True),  # an assignment equals its value
    ("x=3", "y=3", True),  # as after normalisation (both become 3)
    ("x=1,y=2", "y=2,x=1", True),
    ("x=1,y=2", "x=2,y=1", False),  # inside a list the names matter
    ("e=\\frac{\\sqrt2}{2}", "\\frac{\\sqrt{2}}{2}", True),  # `e =` names an eccentricity here
    ("x>2", "2<x", True),
    ("x>2", "2x>4", True),  # positive factor
    ("-x<-2", "x>2", True),  # multiplying by -1 flips the inequality
    ("x>2", "x\\ge 2", False),  # strictness matters
    ("x>2", "x<2", False),
    ("1<x<3", "3>x>1", True),
    ("x>2", "(2,\\infty)", True),  # a one-variable inequality equals its interval
    ("x\\geq 2", "(2,\\infty)", False),
    ("-1\\le x<3", "[-1,3)", True),
    # --- tuples (ordered)
    ("(1,2)", "(2,1)", False),
    ("(1,2)", "(1, 2)", True),
    ("(0.5,2)", "(\\frac12,2)", True),
    ("(1,2,3)", "(1,2)", False),
    ("\\langle 1,2\\rangle", "(1,2)", True),
    ("(1,2,3)", "(1,3,2)", False),
    ("(x,y)", "(x,y)", True),
    # --- sets and bare lists (unordered)
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("1,2", "2,1", True),  # a bare comma list is unordered
    ("1,2,2", "1,2", False),  # ... but counts repeats (multiset)
    ("\\{1,2,2\\}", "\\{1,2\\}", True),  # sets do not
    ("1,2", "1", False),
    ("1,2", "\\{2,1\\}", True),
    ("\\{3\\}", "3", True),
    ("\\emptyset", "\\{\\}", True),
    ("x=1 \\text{ or } x=2", "1,2", True),
    ("\\frac{1\\pm\\sqrt{5}}{2}", "\\frac{1-\\sqrt5}{2},\\frac{1+\\sqrt5}{2}", True),  # ± is two answers
    ("\\pm 3", "3,-3", True),
    ("\\sqrt{2},-\\sqrt{2}", "-\\sqrt{2},\\sqrt{2}", True),
    # --- intervals (ends checked)
    ("[0,1)", "[0,1]", False),
    ("(0,1]", "[0,1)", False),
    ("[0,1)", "[0, 1)", True),
    ("(0,1)", "[0,1)", False),  # `(0,1)` as an interval is open at both ends
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("[-\\infty,2]", "(-\\infty,2]", True),  # bracket type at an infinite end is ignored
    ("[0,\\frac12]", "[0,0.5]", True),
    ("(-\\infty,0)\\cup(1,\\infty)", "(1,\\infty)\\cup(-\\infty,0)", True),
    ("(-\\infty,0)\\cup(1,\\infty)", "(-\\infty,0]\\cup(1,\\infty)", False),
    ("x<0 \\text{ or } x>1", "(-\\infty,0)\\cup(1,\\infty)", True),
    ("x \\in [0,1]", "[0,1]", True),
    # --- matrices (element-wise)
    (PM, "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    (PM, "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", False),  # the transpose
    (PM, "\\begin{pmatrix}1&2\\end{pmatrix}", False),  # shape
    ("\\begin{pmatrix}\\frac12\\\\1\\end{pmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}", True),
    (PM, "(1,2,3,4)", False),
    # --- infinity
    ("\\infty", "\\infty", True),
    ("+\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    ("\\infty", "10^{100}", False),
    # --- words and choices
    ("\\text{Yes}", "yes", True),
    ("yes", "no", False),
    ("\\text{(B)}", "B", True),
    ("B", "C", False),
    ("\\text{Tuesday}", "tuesday", True),
    ("yes", "1", False),
]


def _id(case: tuple[str, str, bool]) -> str:
    return f"{case[0][:30]}|{case[1][:30]}"


@pytest.fixture(scope="module", autouse=True)
def _workers():
    """Start the worker pool once, so that timings below exclude the (~0.5-1 s) interpreter start."""
    E.start_workers(2)
    yield


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_table(case):
    pred, gold, expected = case
    ok, reason = equivalent(pred, gold)
    assert ok is expected, (pred, gold, reason)
    assert reason in E.REASONS
    assert equivalent(gold, pred)[0] is expected  # symmetric


def test_batch_agrees_with_single_calls():
    pairs = [(p, g) for p, g, _ in CASES]
    assert equivalent_many(pairs) == [equivalent(p, g) for p, g in pairs]
    assert [ok for ok, _ in equivalent_many(pairs, workers=1)] == [want for _, _, want in CASES]
    assert [ok for ok, _ in equivalent_many(pairs, workers=0)] == [want for _, _, want in CASES]
    assert equivalent_many([]) == []


@pytest.mark.parametrize("pred,gold,reason", [
    ("42", "42", "exact"),
    ("0.5", "\\frac12", "numeric"),
    ("x^2-1", "(x-1)(x+1)", "identity"),
    ("(1,2)", "(2,1)", "structure"),
    ("\\sin(2x)", "2\\sin x\\cos x", "symbolic"),
    ("yes", "no", "different"),
    ("\\unknowncommand{1}", "1", "unparsable"),
    ("", "1", "unparsable"),
    (None, "1", "unparsable"),
])
def test_reasons(pred, gold, reason):
    assert equivalent(pred, gold)[1] == reason


def test_rel_tol_is_a_parameter():
    assert not equivalent("0.333", "\\frac13")[0]
    assert equivalent("0.333", "\\frac13", rel_tol=1e-2)[0]
    assert not equivalent("3.1", "\\pi")[0]
    assert equivalent("3.1", "\\pi", rel_tol=0.02)[0]


@pytest.mark.parametrize("raw,normalised", [
    # normalize_answer's spellings against raw LaTeX: both are accepted
    ("x \\le 3", "x\\leq3"),
    ("x^2+1", "x^{2}+1"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\boxed{\\dfrac{1}{2}}", "0.5"),
    ("1\\,000", "1000"),
    ("14{,}916", "14916"),
    ("270 (classrooms)", "270"),  # a word label after a number
    ("27 \\mathrm{~min}", "27"),
    ("2\\frac58", "2\\frac{5}{8}"),
    ("2516_8", "2516_{8}"),  # a base-8 numeral: only matches itself
    ("BC", "bc"),  # letter runs are lower-cased, as normalize_answer does
    ("\\text{No}", "no"),
    ("\\left[\\begin{array}{r}-55 \\\\ 13\\end{array}\\right]", "\\begin{pmatrix}-55\\\\13\\end{pmatrix}"),
])
def test_raw_and_normalised_inputs(raw, normalised):
    assert equivalent(raw, normalised)[0], (raw, normalised)


def test_json_damaged_commands_are_repaired():
    assert equivalent("x \n" + "eq 0", "x\\neq 0")[0]  # `\\n` + `eq`: a JSON newline escape
    assert equivalent("\x0c" + "rac{1}{2}", "0.5")[0]  # `\\f` + `rac`: a JSON form feed escape
    assert not equivalent("2516_8", "1358")[0]


# ------------------------------------------------------------------------------------------ safety
def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("pred,gold", [
    ("9^{9^{9^9}}", "1"),
    ("10^{10^{10}}", "10^{10^{10}}+1"),
    ("2**10**10", "1"),
    ("(10!)!", "1"),
    ("2^" * 600 + "2", "2"),  # a 600-deep power tower: no RecursionError
])
def test_huge_powers_return_false_within_the_limit(pred, gold):
    (ok, reason), took = _timed(equivalent, pred, gold, timeout_s=1.0)
    assert ok is False
    assert took < 4.0, (reason, took)  # bounds here say "never hangs", with room for a loaded CI machine


def test_huge_numbers_are_told_apart_by_magnitude():
    # 6-million-bit integers: too big to compute here, different in the first significant digits
    (ok, reason), took = _timed(equivalent, "(3^{2019}-1)^{2018}", "(2^{2019}-1)^{2018}")
    assert (ok, reason) == (False, "numeric") and took < 1.0
    assert equivalent("2^{10^6}", "2^{10^6+1}") == (False, "numeric")
    assert equivalent("2^{2^{20}}", "4^{2^{19}}") == (True, "symbolic")  # equal: sympy checks exactly
    assert equivalent("(2^{10^6}+1)-2^{10^6}", "1")[0]  # cancellation: not decided by 40 digits


def test_deep_nesting_and_huge_inputs():
    nested = "\\frac{1}{" * 500 + "2" + "}" * 500
    (ok, reason), took = _timed(equivalent, nested, "2")
    assert (ok, reason) == (False, "unparsable") and took < 2.0
    assert equivalent(nested, nested) == (True, "exact")
    parens = "(" * 500 + "x" + ")" * 500
    assert equivalent(parens, "x")[0] is False
    big = "1" * 100_000
    (ok, _), took = _timed(equivalent, big, "1")
    assert ok is False and took < 2.0
    (ok, _), took = _timed(equivalent, "x+" * 40_000 + "1", "1")
    assert ok is False and took < 2.0


def test_time_limit_kills_and_replaces_the_worker():
    pool = E._get_pool()
    (result,), took = _timed(pool.run, [[("_sleep", 30.0)]], 0.3, 1, 1e-4)
    assert result == "timeout"
    assert took < 0.3 + 2.5
    # a batch: every job has its own deadline; the fast one is not held up
    results, took = _timed(pool.run, [[("_sleep", 30.0)], [("_sleep", 0.0)], [("_sleep", 30.0)]], 0.5, 3, 1e-4)
    assert results[0] == results[2] == "timeout"
    assert results[1] == [(True, "symbolic")]
    assert took < 2 * (0.5 + 0.5) + 2.0  # start-up of a replacement worker is not charged to a job
    assert equivalent("\\sin(2x)", "2\\sin x\\cos x") == (True, "symbolic")  # the pool still works


def test_calls_from_threads():
    pairs = [("\\sin(2x)", "2\\sin x\\cos x"), ("\\cos(2x)", "1-2\\sin^2x"), ("e^{x+1}", "e\\cdot e^{x}"),
             ("0.5", "\\frac12"), ("\\tan x", "\\frac{\\sin x}{\\cos x}"), ("\\sin x", "\\cos x")]
    want = [(p, g, equivalent(p, g)) for p, g in pairs]
    errors: list[str] = []

    def work() -> None:
        for p, g, w in want:
            got = equivalent(p, g)
            if got != w:
                errors.append(f"{p} vs {g}: {got} != {w}")
        if equivalent_many([(p, g) for p, g, _ in want]) != [w for _, _, w in want]:
            errors.append("batch")

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [w[2][0] for w in want] == [True, True, True, True, True, False]


def _in_child(pairs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
    return [equivalent(p, g) for p, g in pairs] + equivalent_many(pairs)


def test_calls_from_a_process_pool_worker():
    pairs = [("\\sin(2x)", "2\\sin x\\cos x"), ("x^2-1", "(x-1)(x+1)"), ("(1,2)", "(2,1)")]
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as ex:
        got = ex.submit(_in_child, pairs).result(timeout=60)
    want = [(True, "symbolic"), (True, "identity"), (False, "structure")]
    assert got == want + want


def test_workers_stop_with_the_interpreter():
    code = ("from mathctl.grading import equivalence as E\n"
            "print(E.equivalent('\\\\sin(2x)', '2\\\\sin x\\\\cos x'))\n"
            "print(*[w.proc.pid for w in E._get_pool().all])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "(True, 'symbolic')"
    pids = [int(p) for p in lines[1].split()]
    assert pids
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shutdown_and_restart():
    assert equivalent("\\sin(3x)", "3\\sin x-4\\sin^3x") == (True, "symbolic")
    pids = [w.proc.pid for w in E._get_pool().all]
    E.shutdown_workers()
    assert not any(_alive(p) and _zombie_free(p) for p in pids)
    assert equivalent("\\cos(3x)", "4\\cos^3x-3\\cos x") == (True, "symbolic")  # restarted on demand


def _zombie_free(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
