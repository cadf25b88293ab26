r"""Decide whether two math answers are the same: `equivalent(pred, gold) -> (bool, reason)`.

Used for eval scores and GRPO rewards, so it is called millions of times: whatever can be decided
cheaply is decided in this process in pure Python; only what needs computer algebra goes to sympy, in
worker processes under a wall-clock limit. Inputs may be raw LaTeX or the output of
`mathctl.grading.normalize.normalize_answer`; both work (the cleanup here is a cheap subset of it).

Public API: `equivalent`, `equivalent_many`, `start_workers`, `shutdown_workers`, `REASONS`.

Modules, one per stage: `parse.py` (limits, cleanup, tokenizer and parser: stages 1-2), `structure.py`
(answers analysed into values and compared: stage 3), `numeric.py` (in-process evaluation: stage 4),
`workers.py` (sympy in time-limited worker processes: stages 5-6); this module is the front end.

Stages, cheapest first (`reason` names the stage that decided):

1. `exact`: equal strings after cleanup: `$`, `\boxed`, `\left`/`\right`, spacing commands, `\dfrac`,
   `\text{}`-like wrappers (unwrapped; `or`/`and` become commas; unit words after a number dropped,
   also `270 (classrooms)`, `5 cm^2`), `^\circ`, `\%`, `\$`, `{,}`, TeX shorthand braced (`\frac58`,
   `\sqrt2`, `x_1`, `2^10`), JSON-damaged commands repaired (form feed + `rac` -> `\frac`), whitespace
   removed, letter runs of 2+ lower-cased (as `normalize_answer` does: `Yes` = `yes`; single letters keep
   their case, `x` != `X`). Two plain numbers (`42`, `-0.5`) are compared before any of this.
2. Parsing, without sympy and without `eval`: our own recursive-descent parser turns each side into a
   small tuple tree. It knows numbers, `\frac` (also `\frac12`), `\sqrt[n]{x}`, `^`/`**`, `\pi`, `e`,
   `i`, `\infty`, `\cdot`, `\times`, `\div`, `/`, `!`, `\binom`, `|x|`, `\lfloor`/`\lceil`, `\ln`,
   `\log`/`\log_b`, `\exp`, trig/hyperbolic/inverse functions (`\sin^2 x`, `\sin^{-1}x`), implicit
   multiplication (`2x`, `2\pi`, `3\sqrt{2}`, `x(x+1)`, `\sin 2x` = sin(2x); `1/2x` = x/2), variables
   (`x`, `x_1`, `\alpha`), scientific notation (`1.5e3`, `1.5\times10^{3}`), mixed numbers
   (`2\frac{1}{2}` = 5/2, only `<int>\frac{<int>}{<int>}` with a proper fraction) and plain-text
   `sqrt(2)`, `pi`. Anything else (an unknown command, a stray character) makes the side
   `unparsable`; a run of three or more letters that is not a function name makes it a word answer,
   compared as lower-cased text (`different` when not equal).
3. `structure`: the answer is split at top level (bracket-aware) and components are compared
   recursively with stage 4:
   - a bare comma list `1, 2, 3` (also `x=1 or x=2`, `a \pm b`) is an UNORDERED multiset: `1,2` ==
     `2,1`, `1,2,2` != `1,2`;
   - `\{...\}` is a set (order and repeats ignored); a set equals a bare list of the same elements, a
     one-element set equals its element; `\emptyset` == `\{\}`;
   - `(a, b, c)`, `[a, b, c]` and `\langle a, b \rangle` are ordered tuples: `(1,2)` != `(2,1)`; a
     tuple also equals a bare list in the same order;
   - `(a, b)` is a point or an open interval: equal to `(a, b)` element-wise, and to an interval only
     if that is open at both ends;
   - `[a, b]`, `[a, b)`, `(a, b]` are intervals: end points equal and open/closed ends equal, except at
     an infinite end (`[-\infty, 2]` == `(-\infty, 2]`); unions `A \cup B` are compared as sets of
     intervals, without merging (`[0,1]\cup[1,2]` != `[0,2]`); a one-variable inequality (`x > 2`,
     `-1 \le x < 3`) equals its interval, a list of them (`x<0 or x>1`) a union;
   - matrices (`pmatrix`, `bmatrix`, `Bmatrix`, `matrix`, `smallmatrix`, `array`): same shape,
     element-wise;
   - equations: a lone variable on one side makes an assignment, which equals its value (`x = 3` ==
     `3`, and `x = 3` == `y = 3` as after normalisation, but inside a list the names must match:
     `x=1,y=2` != `x=2,y=1`); other equations are equal when lhs - rhs of one is a NONZERO CONSTANT
     multiple of the other's (`y = 2x+1` == `2x + 1 = y` == `2y = 4x + 2`);
   - labels: a name on the left of `=` (`AB`, `g(t)`, `f(2)`, `\frac{AM}{MB}`, `V_1:V_2`, `\angle ABC`: no
     operator or digit outside its brackets) acts as one variable, so `g(t) = 4` == `4` and
     `V_1:V_2 = 2:5` == `2:5`, but two different labels differ (`AB = 5` != `CD = 5`) and `x + 1 = 5`,
     `2x = 6` stay equations;
   - chains: an `=` chain compared with a value states its last part when that is a constant and the
     chain has 3+ parts or a constant on the left (`y = 2+3 = 5` == `5`, `4 \cdot 3 = 12` == `12`); two
     relations are compared whole;
   - solution sets: `x=1,y=2; x=2,y=1` (groups separated by `;`, each assigning the same names in the
     same order) is the list of tuples `(1,2), (2,1)`;
   - ratios `a:b(:c)`: equal to a ratio with the same number of terms, term by term (`2:5` != `4:10`,
     `2:5` != `\frac{2}{5}`);
   - inequalities: both turned to point `<`/`\le`; same strictness and (rhs - lhs) equal up to a
     POSITIVE constant factor (`x > 2` == `2 < x` == `2x > 4`, `x > 2` != `x \ge 2`); chains
     `a < x < b` compare part by part.
4. Scalars (also each component of stage 3):
   - `numeric`, closed-form numbers: evaluated in pure Python, exactly (`fractions.Fraction`) where
     possible (integers, decimals, fractions, integer powers, perfect roots, exact logs `\log_2 8`,
     factorials, binomials), otherwise in floating point (`math`/`cmath`, complex allowed; principal
     branches as in sympy, except that odd roots `\sqrt[3]{-8}` of negative numbers are real).
     TOLERANCE POLICY:
       * both values exact rationals: equal iff exactly equal, except when a decimal literal (`0.3333`,
         `1.5e-3`) appears on either side and neither value is an integer: then a RELATIVE tolerance
         `rel_tol` (default 1e-4) applies. So `0.33333` == `1/3` (1e-5 off), `0.333` != `1/3` (1e-3
         off), `0.5` == `1/2`, but integers never get a tolerance: `2.9999` != `3`, `1000001` !=
         `1000000`, and fractions written as fractions compare exactly: `1/10000` != `1/10001`;
       * a decimal literal against an irrational value (`3.1416` vs `\pi`): |a-b| <= rel_tol *
         max(|a|,|b|), or |a-b| <= 1e-12 (absolute floor for values near 0): `3.1416` == `\pi`,
         `3.14` != `\pi`;
       * no decimal literal on either side (exact forms such as `\sqrt{8}` vs `2\sqrt{2}`): equal if
         the floats agree to 1e-13 relative, different beyond 1e-9 relative (and 1e-12 absolute);
         in between (float noise or a genuine tiny difference, e.g. `0` vs `\sin(\pi)`) sympy decides
         at 30 digits. So `\frac{99}{70}` != `\sqrt{2}` although they agree to 5e-5.
     Bounds: exact powers only up to 2^17-bit results, factorials up to 2000!, literals up to 1000
     characters; larger closed forms are compared by magnitude with 40-digit `decimal` arithmetic
     (exponent range 10^15: `(3^{2019}-1)^{2018}` != `(2^{2019}-1)^{2018}` in microseconds, refusing
     cancellation and exponents above 10^12), which can only prove them different; if it cannot, sympy
     gets them. Float overflow, `\infty` inside arithmetic and undefined values (`1/0`) also go to
     sympy. `9^{9^{9^9}}` is never evaluated in this process.
   - `identity`, expressions in variables built from + - * / and integer powers (rational functions;
     `\pi` and `e` count as further indeterminates, being transcendental): both sides are evaluated
     modulo the prime 2^61-1 at 3 pseudo-random points; one difference proves them different,
     agreement at 3 points means equal (Schwartz-Zippel: a nonzero rational function of degree d
     vanishes at a random point with probability <= d/2^61). Decimal coefficients are exact here
     (`0.3333x` != `x/3`). Proportional (in)equations use the same points (the sign of the factor for
     inequalities from exact rationals at one point).
   - otherwise (functions of variables, `\sqrt{x}`, `e^{x}`, ...): a float probe at 4 points rejects
     clear differences in-process (`numeric`); the rest goes to stage 5.
5. `symbolic`: the tree is converted DIRECTLY into sympy objects (`sympy.Add`, `Pow`, `Symbol(name)`,
   ...: no `parse_expr`, no `eval`, no strings, so no name can reach Python). Closed forms: exact
   rationals by the same policy, others by the 30-digit `evalf` of a - b (then `simplify` for
   near-ties). Expressions in variables: `evalf` to 30 digits at up to 6 mixed-sign rational points;
   one clear difference means different, agreement at >= 2 points means equal; if too few points are
   defined, `simplify(a - b) == 0`. (In)equations compare the ratio of the two (lhs - rhs) the same way.
   Powers whose expansion would exceed 2^24 bits and factorials or binomials above 10^4 are refused
   (`unparsable`) instead of computed.
6. Time limit (`timeout`): every sympy call runs in a separate, long-lived worker process started with
   `subprocess` (`python -c ...`: no fork of the caller, no re-import of `__main__`, works from daemonic
   `multiprocessing` workers and from any thread; no signals). Requests and answers are length-prefixed
   pickles over the worker's stdin/stdout; the caller waits with `select` against a deadline and, when
   it passes, SIGKILLs the worker and starts a replacement at once. The clock of a request starts when
   its worker is ready: start-up (`import sympy`, about 0.5-1 s) is not charged to the answer, so the
   first symbolic call of a process takes that much longer (call `start_workers()` early to hide it).
   Workers are started lazily, reused, shared by all threads (lock-protected idle list), capped at the
   CPU count (at most 8; `MATHCTL_GRADER_WORKERS` overrides) or the `workers` asked for; each has a
   2 GiB address-space limit (`MATHCTL_GRADER_WORKER_MEM_MB`), ignores SIGINT, and exits on EOF of its
   stdin or when its parent dies (polled every second); all are stopped at interpreter exit. After
   `os.fork()` the child drops the inherited pool (closing its copies of the pipes) and starts its own.
   Worker verdicts are cached per (pred, gold) in the process (timeouts are not). Inputs deeper than 48
   brackets, longer than 4096 characters or 2048 tokens are `unparsable` before any recursion, and
   `RecursionError` is caught as a second line of defence.

Reasons (`REASONS`): `exact`, `numeric`, `identity`, `structure`, `symbolic` (True or False);
`different` (word answers that differ, or a word answer against math), `unparsable`, `timeout`,
`error` (a worker died or sympy raised); the last four are always False. An empty answer is never
equal to anything.

`equivalent_many` runs stages 1-4 for every pair in this process, de-duplicates the leftovers and sends
them to up to `workers` worker processes in parallel, each pair under its own `timeout_s`.

Not covered (honest list): percentages vs fractions (`50\%` is 50, not 0.5) and degrees vs radians;
unit conversion, and unit words outside `\text{}` other than after a plain number; repeating decimals
(`0.\overline{3}`); numbers in other bases (`2516_8` only matches itself); mixed numbers other than
`<int>\frac{<int>}{<int>}`; merging of adjacent intervals; set-builder notation, `\mathbb{R}` vs
`(-\infty,\infty)`, complements; `\approx`; derivatives, integrals, sums, limits, `\pmod`, `\gcd`;
function notation `f(x) = ...` against another equation (compared as one in the label and `x`); `\log` without a base is the
natural log (as in sympy), not base 10; odd roots of variables use the principal branch
(`\sqrt[3]{x^3}` != `x`); runs of 3+ letters (`xyz`) are words, not products, and letter runs of 2+
are case-insensitive (`AB` == `ab`); prose answers only match (near-)verbatim; lists longer than 30
items are not matched; the float probe and the sympy point test are probabilistic (false verdicts need
expressions that agree at all sample points, e.g. piecewise functions); POSIX only (`select` on pipes).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from mathctl.grading.numeric import _num_close
from mathctl.grading.parse import _PLAIN_NUM_RE, _clean
from mathctl.grading.structure import _analyze, _cmp, _Oracle
from mathctl.grading.workers import _default_workers, _get_pool, _Pool, shutdown_workers, start_workers

__all__ = ["equivalent", "equivalent_many", "start_workers", "shutdown_workers", "REASONS"]

REASONS = ("exact", "numeric", "identity", "structure", "symbolic", "different", "unparsable", "timeout",
           "error")


# ----------------------------------------------------------------------------------------- front end
class _Pending:
    """A pair whose verdict needs the worker."""

    __slots__ = ("key", "pv", "gv", "oracle")

    def __init__(self, key: tuple, pv: tuple, gv: tuple, oracle: _Oracle):
        self.key, self.pv, self.gv, self.oracle = key, pv, gv, oracle


def _as_text(x: Any) -> str:
    if x is None:
        return ""
    return x if isinstance(x, str) else str(x)


def _prepare(pred: Any, gold: Any, rel_tol: float) -> tuple[bool, str] | _Pending:
    pred, gold = _as_text(pred), _as_text(gold)
    try:
        if _PLAIN_NUM_RE.fullmatch(pred) and _PLAIN_NUM_RE.fullmatch(gold):  # the common case, fast
            if pred == gold:
                return True, "exact"
            r = _num_close(Fraction(pred), Fraction(gold), "." in pred or "." in gold, rel_tol)
            return bool(r), "numeric"
        p, g = _clean(pred), _clean(gold)
        if not p or not g:
            return False, "unparsable"
        if p == g:
            return True, "exact"
        pv, gv = _analyze(p), _analyze(g)
        o = _Oracle(rel_tol)
        tri, reason = _cmp(pv, gv, o)
        if tri is not None:
            return tri, reason
        return _Pending((p, g, rel_tol), pv, gv, o)
    except RecursionError:
        return False, "unparsable"


def _finish(st: _Pending, answers: list | str) -> tuple[bool, str]:
    if isinstance(answers, str):  # the whole request failed: "timeout" or "error"
        return False, answers
    o = st.oracle
    o.answers = dict(zip(o.tasks, answers))
    try:
        tri, reason = _cmp(st.pv, st.gv, o)
    except RecursionError:
        return False, "unparsable"
    if tri is None:
        return False, o.fail or "timeout"
    return tri, reason


def equivalent(pred: str, gold: str, *, timeout_s: float = 1.0, rel_tol: float = 1e-4) -> tuple[bool, str]:
    """Whether answer `pred` equals answer `gold`, and the stage that decided (see module docstring).

    Never raises on bad input and never blocks much longer than `timeout_s` (plus worker start-up the
    first time sympy is needed in this process)."""
    st = _prepare(pred, gold, rel_tol)
    if isinstance(st, tuple):
        return st
    pool = _get_pool()
    hit = pool.cache_get(st.key)
    if hit is not None:
        return hit
    if timeout_s <= 0:
        return False, "timeout"
    res = _finish(st, pool.run([st.oracle.tasks], timeout_s, 1, rel_tol)[0])
    pool.cache_put(st.key, res)
    return res


def equivalent_many(pairs: list[tuple[str, str]], *, timeout_s: float = 1.0, rel_tol: float = 1e-4,
                    workers: int | None = None) -> list[tuple[bool, str]]:
    """`equivalent` for many (pred, gold) pairs, same verdicts: the cheap stages run here, the symbolic
    leftovers (deduplicated) in up to `workers` worker processes at once (None: the CPU count, at most
    8; 0 or 1: one at a time), each pair under its own `timeout_s`."""
    out: list[tuple[bool, str] | None] = [None] * len(pairs)
    pending: dict[tuple, list[int]] = {}
    states: dict[tuple, _Pending] = {}
    pool: _Pool | None = None
    for idx, (pred, gold) in enumerate(pairs):
        st = _prepare(pred, gold, rel_tol)
        if isinstance(st, tuple):
            out[idx] = st
            continue
        pool = pool or _get_pool()
        hit = pool.cache_get(st.key)
        if hit is not None:
            out[idx] = hit
            continue
        if st.key not in states:
            states[st.key] = st
        pending.setdefault(st.key, []).append(idx)
    if pending:
        keys = list(pending)
        if timeout_s <= 0:
            results: list = ["timeout"] * len(keys)
        else:
            parallel = _default_workers() if workers is None else max(1, workers)
            results = pool.run([states[k].oracle.tasks for k in keys], timeout_s, parallel, rel_tol)
        for key, ans in zip(keys, results):
            res = _finish(states[key], ans)
            pool.cache_put(key, res)
            for idx in pending[key]:
                out[idx] = res
    return out  # type: ignore[return-value]
