r"""Decide whether two math answers are the same: `equivalent(pred, gold) -> (bool, reason)`.

Used for eval scores and GRPO rewards, so it is called millions of times: whatever can be decided
cheaply is decided in this process in pure Python; only what needs computer algebra goes to sympy, in
worker processes under a wall-clock limit. Inputs may be raw LaTeX or the output of
`mathctl.grading.normalize.normalize_answer`; both work (the cleanup here is a cheap subset of it).

Public API: `equivalent`, `equivalent_many`, `start_workers`, `shutdown_workers`, `REASONS`.

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
function notation `f(x) = ...` (compared as an equation in `f` and `x`); `\log` without a base is the
natural log (as in sympy), not base 10; odd roots of variables use the principal branch
(`\sqrt[3]{x^3}` != `x`); runs of 3+ letters (`xyz`) are words, not products, and letter runs of 2+
are case-insensitive (`AB` == `ab`); prose answers only match (near-)verbatim; lists longer than 30
items are not matched; the float probe and the sympy point test are probabilistic (false verdicts need
expressions that agree at all sample points, e.g. piecewise functions); POSIX only (`select` on pipes).
"""

from __future__ import annotations

import atexit
import cmath
import decimal
import math
import os
import pickle
import random
import re
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["equivalent", "equivalent_many", "start_workers", "shutdown_workers", "REASONS"]

REASONS = ("exact", "numeric", "identity", "structure", "symbolic", "different", "unparsable", "timeout",
           "error")

# ----------------------------------------------------------------------------------------------- limits
MAX_CHARS = 4096  # longer answers are only compared as strings
MAX_DEPTH = 48  # bracket nesting; bounds the parser's recursion (about 8 frames per level)
MAX_TOKENS = 2048
MAX_BITS = 1 << 17  # largest exact power computed in-process (2^131072 is instant)
MAX_LITERAL = 1000  # digits in one number literal
MAX_FACTORIAL = 2000
MAX_UNORDERED = 30  # items in one unordered list/set that we try to match
WORKER_MAX_BITS = 1 << 24  # largest exact power sympy may compute in the worker
_STARTUP_S = 60.0  # a worker that is not ready by then counts as broken
_IDENTITY_POINTS = 3  # agreeing random points for `identity` (each: false-equal chance ~deg/2^61)

# ----------------------------------------------------------------------------------------------- errors


class _Unparsable(Exception):
    pass


class _Text(Exception):
    """A word answer (`yes`, `Tuesday`): compared as text, not as math."""


class _TooLarge(Exception):
    pass


class _Undefined(Exception):
    pass


class _HasVars(Exception):
    pass


class _NotRational(Exception):
    pass


_NA = object()  # "no in-process value" marker
_EVAL_ERRORS = (_TooLarge, _Undefined, _HasVars, _NotRational, ZeroDivisionError, OverflowError, ValueError,
                TypeError, RecursionError)

# ------------------------------------------------------------------------------------------- cleanup
# Internal one-character spellings of relations and structure markers, so that splitting is a scan.
_CMD_MAP = {
    "dfrac": "\\frac", "tfrac": "\\frac", "cfrac": "\\frac", "dbinom": "\\binom", "tbinom": "\\binom",
    "le": "≤", "leq": "≤", "leqslant": "≤", "leqq": "≤", "ge": "≥", "geq": "≥", "geqslant": "≥",
    "geqq": "≥", "ne": "≠", "neq": "≠", "lt": "<", "gt": ">", "langle": "⟨", "rangle": "⟩",
    "lvert": "|", "rvert": "|", "vert": "|", "mid": "|", "lbrace": "\\{", "rbrace": "\\}", "cup": "∪",
    "pm": "±", "mp": "∓", "in": "∈", "emptyset": "∅", "varnothing": "∅", "circ": "", "degree": "",
    "displaystyle": "", "textstyle": "", "scriptstyle": "", "limits": "", "nolimits": "", "left": "",
    "right": "", "middle": "", "big": "", "Big": "", "bigg": "", "Bigg": "", "bigl": "", "bigr": "",
    "Bigl": "", "Bigr": "", "biggl": "", "biggr": "", "Biggl": "", "Biggr": "", "quad": " ", "qquad": " ",
    "ast": "*", "colon": ":", "dots": "…", "ldots": "…", "cdots": "…",
}
_UNICODE = str.maketrans({
    "−": "-", "–": "-", "—": "-", "×": "\\times ", "·": "\\cdot ", "÷": "\\div ", "π": "\\pi ",
    "∞": "\\infty ", "√": "\\sqrt ", "≤": "≤", "≥": "≥", "≠": "≠", "°": "", "∪": "∪", "∈": "∈", "±": "±",
    "∓": "∓", "∅": "∅", "⟨": "⟨", "⟩": "⟩", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
_DELIM_RE = re.compile(r"\\(?:left|right)\.|\\\\|\\([a-zA-Z]+)")
_SPACING_RE = re.compile(r"\\\\|\\[,;:! >]|~")
_TEXT_RE = re.compile(r"\\(text|textbf|textit|textrm|textsf|texttt|textup|mbox|hbox|mathrm|mathbf|mathit|"
                      r"mathsf|mathtt|boldsymbol|bm|operatorname|boxed|fbox)\s*\{")
_UNIT_RE = re.compile(r"[A-Za-z][A-Za-z .]*")
_SQUARED_RE = re.compile(r"\s*\^\s*(?:\{\s*[23]\s*\}|[23])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\{\}\^\\circ")
_WORD_SEP_RE = re.compile(r"\s+(?:or|and)\s+", re.I)
_WS_RE = re.compile(r"(\\[a-zA-Z]+)?\s+")
_PLAIN_NUM_RE = re.compile(r"[-+]?\d{1,30}(?:\.\d{1,30})?")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_IN_PREFIX_RE = re.compile(r"(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)∈")
_MATRIX_RE = re.compile(r"\\begin\{([pbB]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_MIXED_RE = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_CONTROL_RE = re.compile(r"[\x08\x0c\r\t](?=[a-zA-Z])|\n(?=(?:eq|eg|e\b|abla|ot|otin|leq|geq|mid)\b)")
_CONTROL = {"\x08": "\\b", "\x0c": "\\f", "\r": "\\r", "\t": "\\t", "\n": "\\n"}
_SHORT_ARG = r"(\d|[a-zA-Z]|\\[a-zA-Z]+)"
_SHORT_FRAC_RE = re.compile(r"\\(frac|binom)\s*(?:\{([^{}]*)\}|" + _SHORT_ARG + r")\s*(?:\{([^{}]*)\}|" + _SHORT_ARG + ")")
_SHORT_SQRT_RE = re.compile(r"\\sqrt\s*(\[[^\[\]]*\])?\s*(\d|[a-zA-Z])")
_SCRIPT_RE = re.compile(r"([_^])\s*(-?\d+|[a-zA-Z])")
_LOWER_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")
# a number with a word label: `270 (classrooms)`, `5 apples`, `20 cm^2`
_LABEL_RE = re.compile(r"([-+]?\d[\d,]*(?:\.\d+)?)\s*(\(\s*[A-Za-z][A-Za-z .'\-]*\)|[A-Za-z][A-Za-z .'\-]*?)"
                       r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?")
# A name standing for the answer on the left of `=`: `AB`, `g(t)`, `f(2)`, `V_{1}:V_{2}`, `\\frac{am}{mb}`,
# `\\angle abc`; no operators or numbers outside its brackets, so `x+1 = 5` and `2x = 6` stay equations.
_LABEL_ATOM = (r"(?:\\(?:angle|measuredangle|overline|overrightarrow|widehat|hat|bar|vec|triangle) ?\{?)?"
               r"[A-Za-z]+(?:_\{[A-Za-z0-9]+\}|_[A-Za-z0-9])?'*\}?(?:\([^()=]*\))?")
_LABEL_LHS_RE = re.compile(rf"{_LABEL_ATOM}(?:[:/]{_LABEL_ATOM})*|\\frac\{{{_LABEL_ATOM}\}}\{{{_LABEL_ATOM}\}}")
_NAME_RE = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?")
_SHORT_UNITS = frozenset("cm mm km kg mg ft in mi lb oz hr yd ml".split())


def _match_brace(s: str, i: int) -> int:
    """Index of the `}` closing the `{` at s[i], or -1."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == "{" and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or s[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return j
    return -1


def _unwrap_text(s: str) -> str:
    """`\\text{..}`-like groups: separators (`or`/`and`) become commas, unit words after a number go,
    everything else is unwrapped (content kept)."""
    for _ in range(4):  # nested wrappers: \\boxed{\\text{...}}
        m = _TEXT_RE.search(s)
        if not m:
            return s
        out: list[str] = []
        pos = 0
        while m:
            ob = m.end() - 1
            cb = _match_brace(s, ob)
            if cb < 0:
                return s
            content = s[ob + 1:cb]
            before = ("".join(out) + s[pos:m.start()]).rstrip()
            stripped = content.replace("~", " ").strip()
            low = stripped.lower()
            end = cb + 1
            if low in ("or", "and", "or,", "and,"):
                rep = ","
            elif (m.group(1) not in ("boxed", "fbox", "operatorname", "boldsymbol", "bm", "mathbf")
                  and _after_number(before) and _UNIT_RE.fullmatch(stripped)
                  and (len(stripped) >= 2 or m.group(1).startswith("text") or m.group(1) == "mbox")):
                rep = ""  # a unit (`5\\text{ cm}^2`), dropped with its exponent
                sq = _SQUARED_RE.match(s, end)
                if sq:
                    end = sq.end()
            else:
                rep = content
            out.append(s[pos:m.start()])
            out.append(rep)
            pos = end
            m = _TEXT_RE.search(s, pos)
        out.append(s[pos:])
        s = "".join(out)
    return s


def _after_number(before: str) -> bool:
    """Whether a unit may follow: `5`, `\\frac{1}{2}`, `(x+1)`, `80\\pi`, or `5 cm /` (glue between units)."""
    b = before.rstrip(" /-")
    return bool(b) and (b[-1] in "0123456789})]." or b.endswith(("\\pi", "\\infty")))


def _brace_frac(m: re.Match) -> str:
    num = m.group(2) if m.group(2) is not None else m.group(3)
    den = m.group(4) if m.group(4) is not None else m.group(5)
    return f"\\{m.group(1)}{{{num}}}{{{den}}}"


def _shorthand(s: str) -> str:
    """TeX one-token arguments and scripts get braces: `\\frac58`, `\\sqrt2`, `2516_8`, `10^-3`."""
    if "\\frac" in s or "\\binom" in s:
        s = _SHORT_FRAC_RE.sub(_brace_frac, s)
    if "\\sqrt" in s:
        s = _SHORT_SQRT_RE.sub(lambda m: f"\\sqrt{m.group(1) or ''}{{{m.group(2)}}}", s)
    if "_" in s or "^" in s:
        s = _SCRIPT_RE.sub(r"\1{\2}", s)
    return s


def _squeeze_ws(s: str) -> str:
    """Remove whitespace except one space between a command name and a following letter (`\\pi r`)."""
    def repl(m: re.Match) -> str:
        cmd = m.group(1)
        if cmd is None:
            return ""
        nxt = s[m.end():m.end() + 1]
        return cmd + " " if nxt.isalpha() else cmd
    return _WS_RE.sub(repl, s)


@lru_cache(maxsize=1 << 16)
def _clean(s: str) -> str:
    """Cheap canonical spelling; idempotent. Long inputs are only stripped (they will not be parsed)."""
    if len(s) > MAX_CHARS:
        return s.strip()
    if not s.isprintable():  # JSON turned `\\frac` into form feed + `rac`, `\\neq` into newline + `eq`, ...
        s = _CONTROL_RE.sub(lambda m: _CONTROL[m.group(0)], s)
    s = s.strip()
    if not s.isascii():
        s = s.translate(_UNICODE)
    if "$" in s:
        s = s.replace("\\$", "").replace("$", "").strip()
    m = _LABEL_RE.fullmatch(s.rstrip(".,;:"))
    if m:
        word = m.group(2).strip("() ").split(" ")[0].lower()
        if (len(word) >= 3 and word.replace("-", "").isalpha() and word not in _BARE_WORDS) or word in _SHORT_UNITS:
            s = m.group(1)
    if s.startswith(("\\(", "\\[")) and s.endswith(("\\)", "\\]")):
        s = s[2:-2]
    if "\\" in s:
        s = _unwrap_text(s)
        s = _DEGREE_RE.sub("", s)
        s = _SPACING_RE.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", s)
        s = _DELIM_RE.sub(lambda m: _CMD_MAP.get(m.group(1), m.group(0)) if m.group(1) else
                          ("" if m.group(0) != "\\\\" else "\\\\"), s)
        s = s.replace("\\%", "")
        s = _shorthand(s)
    elif "_" in s or "^" in s:
        s = _SCRIPT_RE.sub(r"\1{\2}", s)
    if "{,}" in s:
        s = s.replace("{,}", ",")
    if "%" in s:
        s = s.replace("%", "")
    if " " in s or "\t" in s or "\n" in s:
        s = _WORD_SEP_RE.sub(",", s)
        s = _squeeze_ws(s).strip()
    if "<=" in s or ">=" in s or "!=" in s:
        s = s.replace("<=", "≤").replace(">=", "≥").replace("!=", "≠")
    if len(s) > 1 and _LOWER_RE.search(s):  # as normalize_answer: `Yes` = `yes`, `BC` = `bc`; x != X
        s = _LOWER_RE.sub(lambda m: m.group(0).lower(), s)
    s = s.rstrip(".,;:/-").lstrip(",;:")
    if s.endswith("\\cdot"):
        s = s[:-5]
    if s.endswith("\\\\"):
        s = s[:-2]
    # one pair of braces around the whole answer: `{5}`
    if len(s) > 2 and s[0] == "{" and _match_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    return s


# -------------------------------------------------------------------------------------------- tokens
_TOKEN_RE = re.compile(
    r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|\\(?P<cmd>[a-zA-Z]+)"
    r"|(?P<word>[a-zA-Z]+)"
    r"|(?P<op>\*\*|\\[{}|]|[-+*/^_()\[\]{}|!])"
    r"|(?P<sp>\s+)"
)
_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc", "arcsin": "asin",
    "arccos": "acos", "arctan": "atan", "arccot": "acot", "arcsec": "asec", "arccsc": "acsc",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "coth": "coth", "ln": "log", "log": "log",
    "exp": "exp", "sqrt": "sqrt",
}
_INVERSE = {"sin": "asin", "cos": "acos", "tan": "atan", "cot": "acot", "sec": "asec", "csc": "acsc"}
# Words allowed without a backslash (plain-text answers: `sqrt(2)`, `pi/2`).
_BARE_WORDS = {w: w for w in ("sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan",
                                "sinh", "cosh", "tanh", "ln", "log", "exp", "sqrt", "pi")}
_BARE_WORDS.update({"infty": "infty", "inf": "infty", "infinity": "infty"})
_GREEK = frozenset("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu "
                   "nu xi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta "
                   "Lambda Xi Sigma Upsilon Phi Psi Omega".split())
_ATOM_CMDS = frozenset(_FUNCS) | _GREEK | {"frac", "binom", "pi", "infty", "lfloor", "lceil"}


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    pos, n = 0, len(s)
    match = _TOKEN_RE.match
    while pos < n:
        m = match(s, pos)
        if m is None:
            raise _Unparsable(s[pos])
        pos = m.end()
        kind = m.lastgroup
        if kind == "sp":
            continue
        val = m.group(kind)
        if kind == "word":
            low = val.lower() if len(val) > 1 else val
            if low in _BARE_WORDS:
                toks.append(("cmd", _BARE_WORDS[low]))
            elif len(val) >= 3:
                raise _Text(val)
            else:
                toks.extend(("sym", ch) for ch in val)
            continue
        if kind == "op" and val == "**":
            val = "^"
        toks.append((kind, val))
    if len(toks) > MAX_TOKENS:
        raise _Unparsable("too many tokens")
    return toks


# -------------------------------------------------------------------------------------------- parser
# Tree nodes (plain tuples: hashable, picklable, cheap):
#   ("n", Fraction, has_decimal)  ("v", name)  ("c", "pi"|"e"|"i"|"inf")  ("+", terms)  ("*", factors)
#   ("neg", x)  ("/", a, b)  ("^", base, exp)  ("root", x, n)  ("f", name, x)  ("log", base|None, x)
#   ("!", x)  ("binom", n, k)
_EOF = ("eof", "")
_TWO = ("n", Fraction(2), False)
_NEG_ONE = ("n", Fraction(-1), False)
_INF = ("c", "inf")


def _num(text: str) -> tuple:
    if text.isdigit() and len(text) <= MAX_LITERAL:
        return ("n", Fraction(int(text)), False)
    if len(text) > MAX_LITERAL:
        raise _TooLarge(text[:20])
    low = text.lower()
    if "e" in low and abs(int(low.split("e")[1])) > 4000:
        raise _TooLarge(text)
    return ("n", Fraction(text), "." in text or "e" in low)


def _neg(node: tuple) -> tuple:
    if node[0] == "n":
        return ("n", -node[1], node[2])
    if node[0] == "neg":
        return node[1]
    return ("neg", node)


def _mul(a: tuple, b: tuple) -> tuple:
    fa = a[1] if a[0] == "*" else (a,)
    fb = b[1] if b[0] == "*" else (b,)
    return ("*", fa + fb)


class _Parser:
    """Recursive descent over the token list; see the module docstring for the grammar it accepts."""

    __slots__ = ("toks", "i", "bar")

    def __init__(self, toks: list[tuple[str, str]]):
        self.toks = toks
        self.i = 0
        self.bar = 0  # open |...| depth: a `|` closes instead of starting a product

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else _EOF

    def expect(self, tok: tuple[str, str]) -> None:
        if self.peek() != tok:
            raise _Unparsable(f"expected {tok[1]}")
        self.i += 1

    def group(self, close: str) -> tuple:
        saved, self.bar = self.bar, 0
        node = self.expr()
        self.expect(("op", close))
        self.bar = saved
        return node

    def expr(self) -> tuple:
        terms = [self.term()]
        while True:
            kind, val = self.peek()
            if kind == "op" and val in ("+", "-"):
                self.i += 1
                t = self.term()
                terms.append(t if val == "+" else _neg(t))
            else:
                break
        if len(terms) == 1:
            return terms[0]
        flat: list[tuple] = []
        for t in terms:
            flat.extend(t[1] if t[0] == "+" else (t,))
        return ("+", tuple(flat))

    def starts_factor(self, kind: str, val: str) -> bool:
        if kind in ("num", "sym"):
            return True
        if kind == "op":
            return val in ("(", "[", "{") or (val == "|" and self.bar == 0)
        return kind == "cmd" and val in _ATOM_CMDS

    def term(self) -> tuple:
        node = self.unary()
        while True:
            kind, val = self.peek()
            if (kind == "op" and val == "*") or (kind == "cmd" and val in ("cdot", "times")):
                self.i += 1
                node = _mul(node, self.unary())
            elif (kind == "op" and val == "/") or (kind == "cmd" and val == "div"):
                self.i += 1
                node = ("/", node, self.unary())
            elif self.starts_factor(kind, val):  # implicit multiplication, same precedence: 1/2x = x/2
                node = _mul(node, self.power())
            else:
                return node

    def unary(self) -> tuple:
        kind, val = self.peek()
        if kind == "op" and val == "-":
            self.i += 1
            return _neg(self.unary())
        if kind == "op" and val == "+":
            self.i += 1
            return self.unary()
        return self.power()

    def power(self) -> tuple:
        base = self.atom()
        while self.peek() == ("op", "!"):
            self.i += 1
            base = ("!", base)
        if self.peek() == ("op", "^"):
            self.i += 1
            return ("^", base, self.exponent())
        return base

    def exponent(self) -> tuple:
        kind, val = self.peek()
        if kind == "op" and val in ("-", "+"):
            self.i += 1
            e = self.exponent()
            return _neg(e) if val == "-" else e
        if kind == "op" and val == "{":
            self.i += 1
            e = self.group("}")
        elif kind == "num":  # the whole digit run: `2^10` is 1024 (plain-text intent)
            self.i += 1
            e = _num(val)
        elif kind in ("sym", "cmd") or (kind == "op" and val == "("):
            e = self.atom()
        else:
            raise _Unparsable("bad exponent")
        if self.peek() == ("op", "^"):  # right associative: 2^3^2 = 2^9
            self.i += 1
            e = ("^", e, self.exponent())
        return e

    def arg(self) -> tuple:
        """One argument of \\frac, \\sqrt, \\binom: a group, or one digit/letter/command as in TeX."""
        kind, val = self.peek()
        if kind == "op" and val == "{":
            self.i += 1
            return self.group("}")
        if kind == "num":
            self.i += 1
            if len(val) > 1 and val.isdigit():
                self.toks.insert(self.i, ("num", val[1:]))
                return _num(val[0])
            return _num(val)
        if kind in ("sym", "cmd"):
            return self.atom()
        raise _Unparsable("bad argument")

    def subscripted(self, base: str) -> tuple:
        if self.peek() != ("op", "_"):
            return ("v", base)
        self.i += 1
        kind, val = self.peek()
        if kind == "op" and val == "{":
            depth, j = 0, self.i
            parts = []
            while j < len(self.toks):
                k2, v2 = self.toks[j]
                if (k2, v2) == ("op", "{"):
                    depth += 1
                elif (k2, v2) == ("op", "}"):
                    depth -= 1
                    if depth == 0:
                        break
                if j > self.i:
                    parts.append(v2)
                j += 1
            else:
                raise _Unparsable("unclosed subscript")
            self.i = j + 1
            sub = "".join(parts)
        elif kind in ("num", "sym", "cmd"):
            self.i += 1
            sub = val
        else:
            raise _Unparsable("bad subscript")
        if not sub:
            raise _Unparsable("empty subscript")
        return ("v", f"{base}_{sub}")

    def func(self, name: str) -> tuple:
        base = None
        if name == "log" and self.peek() == ("op", "_"):
            self.i += 1
            base = self.arg()
        power = None
        if self.peek() == ("op", "^"):
            self.i += 1
            power = self.exponent()
            if power == _NEG_ONE and name in _INVERSE:
                name, power = _INVERSE[name], None
        kind, val = self.peek()
        if kind == "op" and val in ("(", "{"):
            self.i += 1
            arg = self.group(")" if val == "(" else "}")
        else:  # `\\sin 2x` is sin(2x); stops at the next function: `\\sin x \\cos x`
            arg = self.power()
            while True:
                kind, val = self.peek()
                if self.starts_factor(kind, val) and not (kind == "cmd" and val in _FUNCS):
                    arg = _mul(arg, self.power())
                else:
                    break
        node = ("log", base, arg) if name == "log" else ("f", name, arg)
        return ("^", node, power) if power is not None else node

    def atom(self) -> tuple:
        if self.i >= len(self.toks):
            raise _Unparsable("unexpected end")
        kind, val = self.toks[self.i]
        self.i += 1
        if kind == "num":
            return _num(val)
        if kind == "sym":
            if self.peek() != ("op", "_"):
                if val == "e":
                    return ("c", "e")
                if val == "i":
                    return ("c", "i")
            return self.subscripted(val)
        if kind == "op":
            if val == "(":
                return self.group(")")
            if val == "[":
                return self.group("]")
            if val == "{":
                return self.group("}")
            if val == "|":
                self.bar += 1
                node = self.expr()
                self.expect(("op", "|"))
                self.bar -= 1
                return ("f", "abs", node)
            raise _Unparsable(val)
        if kind != "cmd":
            raise _Unparsable(val)
        if val == "frac":
            a = self.arg()
            return ("/", a, self.arg())
        if val == "sqrt":
            n = _TWO
            if self.peek() == ("op", "["):
                self.i += 1
                n = self.group("]")
            kind, val2 = self.peek()
            if kind == "op" and val2 == "(":  # plain-text sqrt(2)
                self.i += 1
                return ("root", self.group(")"), n)
            return ("root", self.arg(), n)
        if val in _FUNCS:
            return self.func(_FUNCS[val])
        if val == "pi":
            return ("c", "pi")
        if val == "infty":
            return _INF
        if val in _GREEK:
            return self.subscripted(val)
        if val == "binom":
            a = self.arg()
            return ("binom", a, self.arg())
        if val in ("lfloor", "lceil"):
            saved, self.bar = self.bar, 0
            node = self.expr()
            self.expect(("cmd", "rfloor" if val == "lfloor" else "rceil"))
            self.bar = saved
            return ("f", "floor" if val == "lfloor" else "ceil", node)
        raise _Unparsable("\\" + val)


def _parse_scalar(s: str) -> tuple:
    m = _MIXED_RE.fullmatch(s)
    if m and int(m.group(3)) < int(m.group(4)):  # mixed number 2\\frac{1}{2} = 5/2
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return ("n", -value if m.group(1) else value, False)
    p = _Parser(_tokenize(s))
    node = p.expr()
    if p.i != len(p.toks):
        raise _Unparsable("trailing input")
    return node


# ------------------------------------------------------------------------------ in-process evaluation
_CONSTS: dict[str, Any] = {"pi": math.pi, "e": math.e, "i": 1j, "inf": math.inf}
_REAL_FN = {"sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
            "atan": math.atan, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh, "exp": math.exp}
_CPLX_FN = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "asin": cmath.asin, "acos": cmath.acos,
            "atan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh, "exp": cmath.exp}
_RECIP = {"cot": "tan", "sec": "cos", "csc": "sin", "coth": "tanh"}  # 1/f(x)
_ARC_RECIP = {"acot": "atan", "asec": "acos", "acsc": "asin"}  # f(1/x)
_ZERO_AT_ZERO = frozenset({"sin", "tan", "asin", "atan", "sinh", "tanh"})
_ONE_AT_ZERO = frozenset({"cos", "cosh", "exp", "sec"})


def _finite(v: Any) -> bool:
    if isinstance(v, Fraction):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    return cmath.isfinite(v)


def _operand(v: Any) -> Any:
    """Infinity may only stand alone (interval ends): inside arithmetic the value is sympy's business."""
    if isinstance(v, Fraction):
        if v.numerator.bit_length() > 4 * MAX_BITS or v.denominator.bit_length() > 4 * MAX_BITS:
            raise _TooLarge("huge rational")
        return v
    if not _finite(v):
        raise _Undefined("infinity in arithmetic")
    return v


def _result(v: Any) -> Any:
    if not isinstance(v, Fraction) and not _finite(v):
        raise _TooLarge("float overflow")
    return v


def _to_c(v: Any) -> Any:
    return float(v) if isinstance(v, Fraction) else v


def _iroot(x: int, n: int) -> int:
    """floor(x ** (1/n)) for x >= 0, by integer Newton iteration from above."""
    if x < 2:
        return x
    if n == 2:
        return math.isqrt(x)
    y = 1 << ((x.bit_length() + n - 1) // n)
    while True:
        z = ((n - 1) * y + x // y ** (n - 1)) // n
        if z >= y:
            return y
        y = z


def _exact_root(q: Fraction, n: int) -> Fraction | None:
    if n > 64 or q.numerator.bit_length() > MAX_BITS or q.denominator.bit_length() > MAX_BITS:
        return None
    a = _iroot(q.numerator, n)
    if a ** n != q.numerator:
        return None
    b = _iroot(q.denominator, n)
    if b ** n != q.denominator:
        return None
    return Fraction(a, b)


def _pow(b: Any, e: Any) -> Any:
    if isinstance(e, Fraction) and isinstance(b, Fraction):
        if e.denominator == 1:
            n = e.numerator
            if b == 0:
                if n < 0:
                    raise _Undefined("0^-n")
                return Fraction(1) if n == 0 else Fraction(0)
            if b == 1:
                return b
            if b == -1:
                return Fraction(1 if n % 2 == 0 else -1)
            if max(b.numerator.bit_length(), b.denominator.bit_length()) * abs(n) > MAX_BITS:
                raise _TooLarge("power")
            return b ** n
        if b > 0:
            r = _exact_root(b, e.denominator)
            if r is not None:
                return _pow(r, Fraction(e.numerator))
    try:
        fb, fe = _to_c(b), _to_c(e)
        if isinstance(fb, float) and isinstance(fe, float) and fb < 0 and not fe.is_integer():
            fb = complex(fb)  # principal branch, as sympy
        return fb ** fe
    except ZeroDivisionError as exc:
        raise _Undefined("0^-x") from exc
    except OverflowError as exc:
        raise _TooLarge("power") from exc


def _root(x: Any, n: Any) -> Any:
    if not (isinstance(n, Fraction) and n.denominator == 1 and n.numerator >= 1):
        return _pow(x, 1 / n)
    k = n.numerator
    if k == 1:
        return x
    if isinstance(x, Fraction):
        if x >= 0:
            r = _exact_root(x, k)
            if r is not None:
                return r
            if x == 0:
                return x
            return math.exp((math.log(x.numerator) - math.log(x.denominator)) / k)
        if k % 2:  # real odd root of a negative number (sympy: real_root)
            return -_root(-x, n)
        x = float(x)
    if isinstance(x, float):
        if x >= 0:
            return x ** (1.0 / k)
        if k % 2:
            return -((-x) ** (1.0 / k))
    return cmath.sqrt(x) if k == 2 else complex(x) ** (1.0 / k)


def _fn(name: str, x: Any) -> Any:
    if name == "abs":
        return abs(x)
    if name in ("floor", "ceil"):
        if isinstance(x, complex):
            if x.imag != 0:
                raise _Undefined("floor of complex")
            x = x.real
        return Fraction(math.floor(x) if name == "floor" else math.ceil(x))
    if name == "sqrt":
        return _root(x, Fraction(2))
    if isinstance(x, Fraction) and x == 0:
        if name in _ZERO_AT_ZERO:
            return Fraction(0)
        if name in _ONE_AT_ZERO:
            return Fraction(1)
    recip = name in _RECIP
    base = _RECIP.get(name) or _ARC_RECIP.get(name) or name
    if name in _ARC_RECIP:
        x = 1 / x  # ZeroDivisionError is handled by the caller
    x = _to_c(x)
    if isinstance(x, float):
        try:
            r = _REAL_FN[base](x)
        except ValueError:
            r = _CPLX_FN[base](complex(x))
    else:
        r = _CPLX_FN[base](x)
    return 1 / r if recip else r


def _ln(x: Any) -> Any:
    if isinstance(x, Fraction):
        if x == 1:
            return Fraction(0)
        if x > 0:
            return math.log(x.numerator) - math.log(x.denominator)
        if x == 0:
            raise _Undefined("log 0")
        return cmath.log(float(x))
    if isinstance(x, float) and x > 0:
        return math.log(x)
    if x == 0:
        raise _Undefined("log 0")
    return cmath.log(x)


def _log(base: Any, x: Any) -> Any:
    if base is None:
        return _ln(x)
    if isinstance(base, Fraction) and isinstance(x, Fraction) and base > 0 and x > 0 and base != 1:
        k = round(_ln(x) / _ln(base))  # exact answer when x is an integer power of base: log_2 8 = 3
        if abs(k) <= 4096 and _pow(base, Fraction(k)) == x:
            return Fraction(k)
    return _ln(x) / _ln(base)


def _ev(node: tuple, env: dict | None) -> Any:
    """Value of a tree: Fraction when exact, else float/complex. Raises one of _EVAL_ERRORS."""
    tag = node[0]
    if tag == "n":
        return node[1]
    if tag == "v":
        if not env or node[1] not in env:
            raise _HasVars(node[1])
        return env[node[1]]
    if tag == "c":
        return _CONSTS[node[1]]
    if tag == "neg":
        return -_ev(node[1], env)
    if tag == "+":
        acc = Fraction(0)
        for t in node[1]:
            acc = _result(_operand(acc) + _operand(_ev(t, env)))
        return acc
    if tag == "*":
        acc = Fraction(1)
        for t in node[1]:
            acc = _result(_operand(acc) * _operand(_ev(t, env)))
        return acc
    if tag == "/":
        a, b = _operand(_ev(node[1], env)), _operand(_ev(node[2], env))
        if b == 0:
            raise _Undefined("division by zero")
        return _result(_operand(a / b))
    if tag == "^":
        return _result(_operand(_pow(_operand(_ev(node[1], env)), _operand(_ev(node[2], env)))))
    if tag == "root":
        return _result(_root(_operand(_ev(node[1], env)), _operand(_ev(node[2], env))))
    if tag == "f":
        return _result(_fn(node[1], _operand(_ev(node[2], env))))
    if tag == "log":
        base = None if node[1] is None else _operand(_ev(node[1], env))
        return _result(_log(base, _operand(_ev(node[2], env))))
    if tag == "!":
        n = _operand(_ev(node[1], env))
        if not (isinstance(n, Fraction) and n.denominator == 1 and n >= 0):
            raise _Undefined("factorial of a non-integer")
        if n > MAX_FACTORIAL:
            raise _TooLarge("factorial")
        return Fraction(math.factorial(int(n)))
    if tag == "binom":
        n, k = _operand(_ev(node[1], env)), _operand(_ev(node[2], env))
        if not all(isinstance(v, Fraction) and v.denominator == 1 for v in (n, k)) or n < 0:
            raise _Undefined("binomial of non-integers")
        if n > 5000:
            raise _TooLarge("binomial")
        return Fraction(math.comb(int(n), int(k)) if k >= 0 else 0)
    raise _Unparsable(tag)


@lru_cache(maxsize=1 << 16)
def _meta(node: tuple) -> tuple[frozenset, frozenset, bool, Any]:
    """(variables, constants, has a decimal literal, closed-form value or _NA) of a tree; cached."""
    names: set[str] = set()
    consts: set[str] = set()
    dec = False
    stack = [node]
    while stack:
        t = stack.pop()
        tag = t[0]
        if tag == "n":
            dec = dec or t[2]
        elif tag == "v":
            names.add(t[1])
        elif tag == "c":
            consts.add(t[1])
        elif tag in ("+", "*"):
            stack.extend(t[1])
        elif tag in ("neg", "!"):
            stack.append(t[1])
        elif tag == "f":
            stack.append(t[2])
        elif tag == "log":
            stack.append(t[2])
            if t[1] is not None:
                stack.append(t[1])
        else:  # "/", "^", "root", "binom"
            stack.append(t[1])
            stack.append(t[2])
    value = _NA
    if not names:
        try:
            value = _ev(node, None)
            if not _finite(value) and not (node == _INF or node == ("neg", _INF)):
                value = _NA
        except _EVAL_ERRORS:
            value = _NA
    return frozenset(names), frozenset(consts), dec, value


def _ev_exact(node: tuple, env: dict) -> Fraction:
    """Exact value at a rational point; `\\pi` and `e` are indeterminates. Raises _NotRational for
    anything beyond a rational function (roots of non-squares, functions, variable exponents)."""
    tag = node[0]
    if tag == "n":
        return node[1]
    if tag == "v":
        return env[node[1]]
    if tag == "c":
        if node[1] in ("pi", "e"):
            return env["\\" + node[1]]
        raise _NotRational(node[1])
    if tag == "neg":
        return -_ev_exact(node[1], env)
    if tag == "+":
        acc = Fraction(0)
        for t in node[1]:
            acc = _operand(acc + _ev_exact(t, env))
        return acc
    if tag == "*":
        acc = Fraction(1)
        for t in node[1]:
            acc = _operand(acc * _ev_exact(t, env))
        return acc
    if tag == "/":
        b = _ev_exact(node[2], env)
        if b == 0:
            raise _Undefined("division by zero")
        return _operand(_ev_exact(node[1], env) / b)
    if tag == "^":
        names, consts, _, e = _meta(node[2])
        if names or not isinstance(e, Fraction) or e.denominator != 1:
            raise _NotRational("exponent")
        return _pow(_ev_exact(node[1], env), e)
    names, consts, _, value = _meta(node)
    if not names and not (consts & {"pi", "e"}) and isinstance(value, Fraction):
        return value  # e.g. \\sqrt{4}, 3!, \\log_2 8 inside a polynomial
    raise _NotRational(tag)


_P = (1 << 61) - 1  # a Mersenne prime: the identity test works in the field of integers mod _P


def _ev_mod(node: tuple, env: dict) -> int:
    """Value mod _P of a rational function at a point of residues (`\\pi`, `e` are indeterminates).
    Raises _NotRational for anything else, _Undefined when a denominator vanishes."""
    tag = node[0]
    if tag == "n":
        q = node[1]
        if q.denominator == 1:
            return q.numerator % _P
        return q.numerator % _P * pow(q.denominator, -1, _P) % _P
    if tag == "v":
        return env[node[1]]
    if tag == "c":
        if node[1] in ("pi", "e"):
            return env["\\" + node[1]]
        raise _NotRational(node[1])
    if tag == "neg":
        return -_ev_mod(node[1], env) % _P
    if tag == "+":
        return sum(_ev_mod(t, env) for t in node[1]) % _P
    if tag == "*":
        acc = 1
        for t in node[1]:
            acc = acc * _ev_mod(t, env) % _P
        return acc
    if tag == "/":
        b = _ev_mod(node[2], env)
        if b == 0:
            raise _Undefined("division by zero")
        return _ev_mod(node[1], env) * pow(b, -1, _P) % _P
    if tag == "^":
        names, _, _, e = _meta(node[2])
        if names or not isinstance(e, Fraction) or e.denominator != 1:
            raise _NotRational("exponent")
        b = _ev_mod(node[1], env)
        n = e.numerator
        if n < 0:
            if b == 0:
                raise _Undefined("0^-n")
            b, n = pow(b, -1, _P), -n
        return pow(b, n, _P)
    names, consts, _, value = _meta(node)
    if not names and not (consts & {"pi", "e"}) and isinstance(value, Fraction):
        return _ev_mod(("n", value, False), env)  # e.g. \\sqrt{4}, 3!, \\log_2 8 inside a polynomial
    raise _NotRational(tag)


@lru_cache(maxsize=4096)
def _mod_point(name: str, k: int) -> int:
    return random.Random(f"m|{name}|{k}").randrange(2, _P - 1)


@lru_cache(maxsize=4096)
def _rat_point(name: str, k: int) -> Fraction:
    rng = random.Random(f"q|{name}|{k}")
    num = rng.randint(1, 1 << 24) * (1 if rng.random() < 0.5 else -1)
    return Fraction(num, rng.randint(1, 1 << 12))


@lru_cache(maxsize=4096)
def _float_point(name: str, k: int) -> float:
    rng = random.Random(f"f|{name}|{k}")
    v = rng.uniform(0.2, 0.95)
    return v if rng.random() < 0.5 else -v


def _num_close(a: Any, b: Any, dec: bool, rel_tol: float) -> bool | None:
    """The tolerance policy of the module docstring; None = too close to call in floating point."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if a == b:
            return True
        if not dec or a.denominator == 1 or b.denominator == 1:
            return False
        return abs(a - b) <= _frac_tol(rel_tol) * max(abs(a), abs(b))
    try:
        ca, cb = complex(_to_c(a)), complex(_to_c(b))
    except OverflowError:
        return None
    if not (cmath.isfinite(ca) and cmath.isfinite(cb)):
        if cmath.isnan(ca) or cmath.isnan(cb):
            return None
        return ca == cb
    d = abs(ca - cb)
    m = max(abs(ca), abs(cb))
    if dec:
        return d <= rel_tol * m or d <= 1e-12
    if d <= 1e-13 * m:
        return True
    if d > 1e-9 * m and d > 1e-12:
        return False
    return None


@lru_cache(maxsize=64)
def _frac_tol(rel_tol: float) -> Fraction:
    return Fraction(repr(rel_tol))  # 1e-4 -> exactly 1/10000


def _point_env(names: list[str], k: int, kind: str) -> dict:
    point = {"mod": _mod_point, "exact": _rat_point, "float": _float_point}[kind]
    return {n: point(n, k) for n in names}


def _indeterminates(*metas: tuple) -> list[str]:
    names: set[str] = set()
    for m in metas:
        names |= m[0] | {"\\" + c for c in m[1] & {"pi", "e"}}
    return sorted(names)


def _mod_values(a: tuple, b: tuple, names: list[str]):
    """(a, b) evaluated mod _P at up to 3 * _IDENTITY_POINTS random points, skipping points where either
    is undefined. _NotRational/RecursionError/ValueError propagate to the caller."""
    for k in range(3 * _IDENTITY_POINTS):
        env = _point_env(names, k, "mod")
        try:
            yield _ev_mod(a, env), _ev_mod(b, env)
        except _Undefined:
            continue


def _identity(a: tuple, b: tuple) -> bool | None:
    """Rational-function identity test mod _P at random points (see docstring); None when n/a."""
    names = _indeterminates(_meta(a), _meta(b))
    agree = 0
    try:
        for va, vb in _mod_values(a, b, names):
            if va != vb:
                return False
            agree += 1
            if agree >= _IDENTITY_POINTS:
                return True
    except (_NotRational, RecursionError, ValueError):  # ValueError: a literal's denominator divisible by _P
        return None
    return None


def _probe_values(a: tuple, b: tuple, k: int, names: list[str]) -> tuple[complex, complex] | None:
    env = _point_env(names, k, "float")
    try:
        va, vb = complex(_to_c(_ev(a, env))), complex(_to_c(_ev(b, env)))
    except _EVAL_ERRORS:
        return None
    if not (cmath.isfinite(va) and cmath.isfinite(vb)):
        return None
    return va, vb


def _probe_differs(a: tuple, b: tuple) -> bool:
    """Float evaluation at 4 points: True only when the two clearly differ at 2 of them."""
    names = sorted(_meta(a)[0] | _meta(b)[0])
    diff = 0
    for k in range(4):
        vals = _probe_values(a, b, k, names)
        if vals is None:
            continue
        d = abs(vals[0] - vals[1])
        if d > 1e-6 * max(abs(vals[0]), abs(vals[1])) and d > 1e-9:
            diff += 1
            if diff >= 2:
                return True
    return False


# Huge closed forms (beyond MAX_BITS): 40 significant digits with an exponent range of 10^15 tell
# `(3^{2019}-1)^{2018}` from `(2^{2019}-1)^{2018}` in microseconds. Used only to prove a difference.
_BIG = decimal.Context(prec=40, Emax=10 ** 15, Emin=-10 ** 15,
                       traps=[decimal.Overflow, decimal.Underflow, decimal.InvalidOperation, decimal.DivisionByZero])
_BIG_CONSTS = {"pi": decimal.Decimal("3.14159265358979323846264338327950288419716939937511"),
               "e": decimal.Decimal("2.71828182845904523536028747135266249775724709369996")}


def _ev_big(node: tuple) -> decimal.Decimal:
    c, tag = _BIG, node[0]
    if tag == "n":
        return c.divide(decimal.Decimal(node[1].numerator), decimal.Decimal(node[1].denominator))
    if tag == "c" and node[1] in _BIG_CONSTS:
        return _BIG_CONSTS[node[1]]
    if tag == "neg":
        return c.minus(_ev_big(node[1]))
    if tag == "+":
        vals = [_ev_big(t) for t in node[1]]
        acc = decimal.Decimal(0)
        for v in vals:
            acc = c.add(acc, v)
        biggest = max(c.abs(v) for v in vals)
        if acc == 0 or c.multiply(biggest, decimal.Decimal("1e-10")) > c.abs(acc):
            raise _Undefined("cancellation: 40 digits are not enough")
        return acc
    if tag == "*":
        acc = decimal.Decimal(1)
        for t in node[1]:
            acc = c.multiply(acc, _ev_big(t))
        return acc
    if tag == "/":
        return c.divide(_ev_big(node[1]), _ev_big(node[2]))
    if tag in ("^", "root"):
        x, e = _ev_big(node[1]), _ev_big(node[2])
        if tag == "root":
            if e != e.to_integral_value() or e < 1:
                raise _Undefined("root index")
            if x < 0 and c.remainder(e, 2) == 1:
                return c.minus(c.power(c.minus(x), c.divide(1, e)))
            e = c.divide(1, e)
        if c.abs(e) > 10 ** 12 or (x < 0 and e != e.to_integral_value()):
            raise _Undefined("exponent")  # errors grow with the exponent; complex results not handled
        return c.power(x, e)
    raise _Undefined(tag)


def _big_differs(a: tuple, b: tuple) -> bool:
    try:
        x, y = _ev_big(a), _ev_big(b)
        scale = max(_BIG.abs(x), _BIG.abs(y))
        return scale > 0 and _BIG.abs(_BIG.subtract(x, y)) > _BIG.multiply(scale, decimal.Decimal("1e-25"))
    except (decimal.DecimalException, _Undefined, RecursionError, ValueError, TypeError):
        return False


def _scalar_inproc(a: tuple, b: tuple, rel_tol: float) -> tuple[bool | None, str]:
    if a == b:
        return True, "exact"
    ma, mb = _meta(a), _meta(b)
    if not ma[0] and not mb[0]:
        if ma[3] is _NA or mb[3] is _NA:
            return (False, "numeric") if _big_differs(a, b) else (None, "symbolic")
        r = _num_close(ma[3], mb[3], ma[2] or mb[2], rel_tol)
        return r, ("numeric" if r is not None else "symbolic")
    r = _identity(a, b)
    if r is not None:
        return r, "identity"
    if _probe_differs(a, b):
        return False, "numeric"
    return None, "symbolic"


def _diff(a: tuple, b: tuple) -> tuple:
    return ("+", (a, _neg(b)))


def _prop_sign(d1: tuple, d2: tuple, names: list[str]) -> bool | None:
    """Sign of the constant d1/d2 (known to be constant), from exact rationals at one point."""
    for k in range(6):
        env = _point_env(names, k, "exact")
        try:
            v1, v2 = _ev_exact(d1, env), _ev_exact(d2, env)
        except (_Undefined, ZeroDivisionError):
            continue
        except (_NotRational, _TooLarge, OverflowError, RecursionError):
            return None
        if v1 != 0 and v2 != 0:
            return (v1 > 0) == (v2 > 0)
    return None


def _prop_inproc(d1: tuple, d2: tuple, positive: bool) -> tuple[bool | None, str]:
    """Is d1 = k * d2 for a constant k != 0 (k > 0 when `positive`)?"""
    m1, m2 = _meta(d1), _meta(d2)
    names = _indeterminates(m1, m2)
    ratio = None
    valid = 0
    try:
        for v1, v2 in _mod_values(d1, d2, names):
            if v1 == 0 or v2 == 0:
                if v1 == v2:
                    continue
                return False, "identity"
            r = v1 * pow(v2, -1, _P) % _P
            if ratio is None:
                ratio = r
            elif r != ratio:
                return False, "identity"
            valid += 1
            if valid >= _IDENTITY_POINTS:
                if not positive:
                    return True, "identity"
                sign = _prop_sign(d1, d2, names)
                return (sign, "identity") if sign is not None else (None, "symbolic")
        return None, "symbolic"
    except (_NotRational, RecursionError, ValueError):
        pass
    # float probe: clearly different ratios at two points disprove proportionality
    ratios = []
    for k in range(4):
        vals = _probe_values(d1, d2, k, sorted(m1[0] | m2[0]))  # pi, e: real values here
        if vals is None or vals[1] == 0:
            continue
        ratios.append(vals[0] / vals[1])
    if len(ratios) >= 2 and any(abs(r - ratios[0]) > 1e-6 * max(abs(r), abs(ratios[0])) + 1e-9
                                for r in ratios[1:]):
        return False, "numeric"
    return None, "symbolic"


# ----------------------------------------------------------------------------------------- structure
# Values: ("expr", tree) ("rel", ops, trees) ("text", key) ("bad", text or "") ("list", vals) ("set", vals)
# ("tuple", vals) ("paren2", (a, b)) ("interval", left_closed, a_tree, b_tree, right_closed)
# ("union", vals) ("matrix", rows)
_OPEN = "([{⟨"
_CLOSE = ")]}⟩"
_STRUCT = frozenset(",;≤≥≠=<>∪±∓")
_RELS = frozenset("=<>≤≥≠")


def _scan(s: str) -> tuple[int, list[tuple[int, str]], int] | None:
    """(max depth, top-level separator positions, index where depth first returns to 0) or None."""
    depth = maxd = 0
    seps: list[tuple[int, str]] = []
    first_zero = -1
    for i, ch in enumerate(s):
        if ch in _OPEN:
            depth += 1
            if depth > maxd:
                maxd = depth
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
            if depth == 0 and first_zero < 0:
                first_zero = i
        elif depth == 0 and ch in _STRUCT:
            seps.append((i, ch))
    if depth != 0:
        return None
    return maxd, seps, first_zero


def _split_at(s: str, cuts: list[int]) -> list[str]:
    out, start = [], 0
    for c in cuts:
        out.append(s[start:c])
        start = c + 1
    out.append(s[start:])
    return out


def _text_key(s: str) -> tuple:
    key = re.sub(r"[^0-9a-z]", "", s.lower())
    return ("text", key) if key else ("bad", "")


def _scalar_value(s: str) -> tuple:
    try:
        return ("expr", _parse_scalar(s))
    except _Text:
        return _text_key(s)
    except (_Unparsable, _TooLarge, ValueError, ZeroDivisionError, IndexError):
        return ("bad", s)


def _ratio_or_scalar(s: str) -> tuple:
    if ":" in s and s.count(":") <= 8:
        terms = [_tree(p) for p in s.split(":")]
        if all(t is not None for t in terms):
            return ("ratio", tuple(terms))  # `2:5`, `1:2:3`
    return _scalar_value(s)


def _tree(s: str) -> tuple | None:
    v = _scalar_value(s)
    return v[1] if v[0] == "expr" else None


@lru_cache(maxsize=1 << 16)
def _analyze(s: str) -> tuple:
    if not s:
        return ("bad", "")
    if len(s) > MAX_CHARS:
        return ("bad", "")
    try:
        return _value(s, 0)
    except RecursionError:
        return ("bad", "")


def _value(s: str, level: int) -> tuple:
    if level > 6 or not s:
        return ("bad", "")
    if s in ("∅", "\\{\\}", "{}"):
        return ("set", ())
    m = _IN_PREFIX_RE.match(s)
    if m and m.end() < len(s):
        s = s[m.end():]
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("\\begin"):
        return _matrix(s, level)
    if not _STRUCT.intersection(s) and "(" not in s and "[" not in s and "⟨" not in s and "\\{" not in s:
        if s.count("{") <= MAX_DEPTH:  # plain scalar and too few braces to nest deeper than the limit
            return _ratio_or_scalar(s)
    info = _scan(s)
    if info is None:
        return ("bad", s)
    maxd, seps, first_zero = info
    if maxd > MAX_DEPTH:
        return ("bad", "")
    if ";" in s and "," in s:
        solutions = _solution_tuples(s, [i for i, ch in seps if ch == ";"], level)
        if solutions is not None:
            return solutions
    commas = [i for i, ch in seps if ch in ",;"]
    if commas:
        parts = [p for p in _split_at(s, commas)]
        if any(not p for p in parts):
            return ("bad", "")
        return ("list", tuple(_value(p, level + 1) for p in parts))
    n_pm = s.count("±") + s.count("∓")
    if n_pm == 1:  # a ± b -> {a + b, a - b}, also inside \\frac{1 \\pm \\sqrt{5}}{2}
        i = s.index("±") if "±" in s else s.index("∓")
        return ("list", (_value(s[:i] + "+" + s[i + 1:], level + 1), _value(s[:i] + "-" + s[i + 1:], level + 1)))
    if n_pm > 1:
        return ("bad", s)
    unions = [i for i, ch in seps if ch == "∪"]
    if unions:
        return ("union", tuple(_value(p, level + 1) for p in _split_at(s, unions)))
    rels = [(i, ch) for i, ch in seps if ch in _RELS]
    if rels:
        parts = _split_at(s, [i for i, _ in rels])
        trees = [_tree(p) for p in parts]
        if len(parts) == 2 and rels[0][1] == "=" and _LABEL_LHS_RE.fullmatch(parts[0]) and (
                trees[0] is None or trees[0][0] != "v"):
            if trees[1] is None:
                value = _value(parts[1], level + 1)  # `V_1:V_2 = 2:5`: the labelled value
                return value if value[0] != "bad" else ("bad", s)
            trees[0] = ("v", "label " + parts[0])  # `g(t) = 4`, `AB = 5`: the label acts as one variable
        if any(t is None for t in trees):
            if len(parts) == 2 and rels[0][1] == "=" and trees[0] is not None and trees[0][0] == "v":
                return _value(parts[1], level + 1)  # `x = (1, 2)`: the assignment's value
            return ("bad", s)
        return ("rel", tuple(ch for _, ch in rels), tuple(trees))
    if s.startswith("\\{") and s.endswith("\\}") and first_zero == len(s) - 1:
        inner = s[2:-2]
        if not inner:
            return ("set", ())
        sub = _scan(inner)
        if sub is None:
            return ("bad", s)
        items = _split_at(inner, [i for i, ch in sub[1] if ch in ",;"])
        if any(not p for p in items):
            return ("bad", "")
        return ("set", tuple(_value(p, level + 1) for p in items))
    if s[0] in "([⟨" and first_zero == len(s) - 1 and s[-1] in ")]⟩":
        inner = s[1:-1]
        sub = _scan(inner)
        if sub is None:
            return ("bad", s)
        cuts = [i for i, ch in sub[1] if ch in ",;"]
        if not cuts:
            if s[0] == "⟨":
                return ("tuple", (_value(inner, level + 1),))
            return _value(inner, level)  # grouping only: `(x+1)`, `[\\begin{array}..]`, `((1,2))`
        items = _split_at(inner, cuts)
        if any(not p for p in items):
            return ("bad", "")
        if s[0] == "⟨" or len(items) > 2:
            return ("tuple", tuple(_value(p, level + 1) for p in items))
        if s[0] == "(" and s[-1] == ")":
            return ("paren2", tuple(_value(p, level + 1) for p in items))
        a, b = _tree(items[0]), _tree(items[1])
        if a is None or b is None or s[-1] == "⟩":
            return ("bad", s)
        return ("interval", s[0] == "[", a, b, s[-1] == "]")
    return _ratio_or_scalar(s)




def _solution_tuples(s: str, semis: list[int], level: int) -> tuple | None:
    """`x=1,y=2; x=2,y=1` -> the solutions (1,2), (2,1) as a list of tuples, when every group assigns the
    same names in the same order; else None."""
    names = None
    tuples = []
    for group in _split_at(s, semis):
        items = _split_top_level_commas(group)
        if items is None or len(items) < 2:
            return None
        pairs = [item.split("=", 1) for item in items]
        if any(len(p) != 2 or not _NAME_RE.fullmatch(p[0]) for p in pairs):
            return None
        if names is None:
            names = [p[0] for p in pairs]
        elif [p[0] for p in pairs] != names:
            return None
        tuples.append(("tuple", tuple(_value(p[1], level + 2) for p in pairs)))
    return ("list", tuple(tuples))


def _split_top_level_commas(s: str) -> list[str] | None:
    info = _scan(s)
    if info is None:
        return None
    return _split_at(s, [i for i, ch in info[1] if ch == ","])


def _matrix(s: str, level: int) -> tuple:
    m = _MATRIX_RE.fullmatch(s)
    if not m:
        return ("bad", s)
    body = m.group(2).replace("\\hline", "")
    rows = [r for r in body.split("\\\\")]
    if rows and not rows[-1].strip():
        rows.pop()
    cells = [r.split("&") for r in rows]
    if not cells or any(len(r) != len(cells[0]) for r in cells):
        return ("bad", s)
    return ("matrix", tuple(tuple(_value(c.strip(), level + 1) for c in r) for r in cells))


# ---------------------------------------------------------------------------------------- comparison
class _Oracle:
    """Answers scalar questions (in-process, else from worker answers) and collects what sympy must
    decide. The structure comparison runs once to collect, and once more with the answers."""

    __slots__ = ("rel_tol", "memo", "tasks", "answers", "fail")

    def __init__(self, rel_tol: float):
        self.rel_tol = rel_tol
        self.memo: dict[tuple, tuple[bool | None, str]] = {}
        self.tasks: list[tuple] = []
        self.answers: dict[tuple, tuple[bool | None, str]] | None = None
        self.fail: str | None = None

    def ask(self, task: tuple) -> tuple[bool | None, str]:
        r = self.memo.get(task)
        if r is None:
            if task[0] == "eq":
                r = _scalar_inproc(task[1], task[2], self.rel_tol)
            else:
                r = _prop_inproc(task[1], task[2], task[3])
            self.memo[task] = r
            if r[0] is None:
                self.tasks.append(task)
        if r[0] is not None or self.answers is None:
            return r
        ans = self.answers.get(task, (None, "timeout"))
        if ans[0] is None and self.fail is None:
            self.fail = ans[1]
        return ans

    def scalar(self, a: tuple, b: tuple) -> tuple[bool | None, str]:
        return self.ask(("eq", a, b))

    def prop(self, d1: tuple, d2: tuple, positive: bool) -> tuple[bool | None, str]:
        return self.ask(("prop", d1, d2, positive))


def _all(results) -> tuple[bool | None, str]:
    unknown = False
    for tri, _ in results:
        if tri is False:
            return False, "structure"
        if tri is None:
            unknown = True
    return (None if unknown else True), "structure"


def _matching(m: list[list[bool | None]], accept_unknown: bool) -> bool:
    """Perfect bipartite matching (Kuhn) on the edges that are True (or not False)."""
    n = len(m)
    owner = [-1] * n

    def try_row(i: int, seen: list[bool]) -> bool:
        for j in range(n):
            ok = m[i][j] is True or (accept_unknown and m[i][j] is None)
            if ok and not seen[j]:
                seen[j] = True
                if owner[j] < 0 or try_row(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(try_row(i, [False] * n) for i in range(n))


def _unordered(a: tuple, b: tuple, o: _Oracle, multiset: bool) -> tuple[bool | None, str]:
    """Match two collections regardless of order (sets: repeats ignored; multisets: a perfect matching)."""
    if multiset and len(a) != len(b):
        return False, "structure"
    if not a or not b:
        return (len(a) == len(b)), "structure"
    if len(a) > MAX_UNORDERED or len(b) > MAX_UNORDERED:
        return False, "structure"
    m = [[_cmp(x, y, o, True)[0] for y in b] for x in a]
    if multiset:
        if _matching(m, False):
            return True, "structure"
        return (None if _matching(m, True) else False), "structure"
    rows_ok = all(any(v is True for v in row) for row in m)
    cols_ok = all(any(m[i][j] is True for i in range(len(a))) for j in range(len(b)))
    if rows_ok and cols_ok:
        return True, "structure"
    if any(all(v is False for v in row) for row in m) or any(
            all(m[i][j] is False for i in range(len(a))) for j in range(len(b))):
        return False, "structure"
    return None, "structure"


_LETTER_CONSTS = (("c", "e"), ("c", "i"))  # `e = \\frac{\\sqrt2}{2}` names an eccentricity
_INEQ = {"<": (1, True), "≤": (1, False), ">": (-1, True), "≥": (-1, False)}


def _norm_ineq(v: tuple) -> tuple[tuple, tuple] | None:
    """Inequality chain pointing `<`: (parts, strict flags), or None."""
    ops, parts = v[1], v[2]
    if not all(op in _INEQ for op in ops):
        return None
    dirs = {_INEQ[op][0] for op in ops}
    if len(dirs) != 1:
        return None
    stricts = tuple(_INEQ[op][1] for op in ops)
    if dirs == {-1}:
        return parts[::-1], stricts[::-1]
    return parts, stricts


def _assignment(v: tuple) -> tuple | None:
    """`x = expr` (or `expr = x`) with x not in expr: the expr."""
    if v[1] != ("=",):
        return None
    lhs, rhs = v[2]
    if (lhs[0] == "v" and lhs[1] not in _meta(rhs)[0]) or lhs in _LETTER_CONSTS:
        return rhs
    if (rhs[0] == "v" and rhs[1] not in _meta(lhs)[0]) or rhs in _LETTER_CONSTS:
        return lhs
    return None


def _assigned_name(v: tuple) -> str:
    lhs, rhs = v[2]
    side = lhs if (lhs[0] == "v" and lhs[1] not in _meta(rhs)[0]) or lhs in _LETTER_CONSTS else rhs
    return str(side[1])


def _chain_value(v: tuple) -> tuple | None:
    """`y = 2+3 = 5` and `4 \\cdot 3 = 12`: the last value of an equality chain, when it is a constant and
    the chain is more than one equation in variables (3+ parts, or a constant on the left)."""
    ops, parts = v[1], v[2]
    if any(op != "=" for op in ops) or _meta(parts[-1])[0]:
        return None
    if len(parts) == 2 and _meta(parts[0])[0]:
        return None
    return parts[-1]


def _rel_to_interval(v: tuple) -> tuple | None:
    norm = _norm_ineq(v)
    if norm is None:
        return None
    parts, stricts = norm
    free = [_meta(p)[0] for p in parts]
    if len(parts) == 2:
        if parts[1][0] == "v" and not free[0]:
            return ("interval", not stricts[0], parts[0], _INF, False)
        if parts[0][0] == "v" and not free[1]:
            return ("interval", False, ("neg", _INF), parts[1], not stricts[0])
    elif len(parts) == 3 and parts[1][0] == "v" and not free[0] and not free[2]:
        return ("interval", not stricts[0], parts[0], parts[2], not stricts[1])
    return None


def _as_interval(v: tuple) -> tuple | None:
    if v[0] == "interval":
        return v
    if v[0] == "paren2" and v[1][0][0] == "expr" and v[1][1][0] == "expr":
        return ("interval", False, v[1][0][1], v[1][1][1], False)
    if v[0] == "rel":
        return _rel_to_interval(v)
    return None


def _is_inf(t: tuple) -> bool:
    value = _meta(t)[3]
    return isinstance(value, float) and math.isinf(value)


def _cmp_interval(p: tuple, g: tuple, o: _Oracle) -> tuple[bool | None, str]:
    for cp, cg, xp, xg in ((p[1], g[1], p[2], g[2]), (p[4], g[4], p[3], g[3])):
        if cp != cg and not (_is_inf(xp) or _is_inf(xg)):
            return False, "structure"
    return _all(o.scalar(x, y) for x, y in ((p[2], g[2]), (p[3], g[3])))


def _rel_vs_rel(p: tuple, g: tuple, o: _Oracle, nested: bool) -> tuple[bool | None, str]:
    np_, ng = _norm_ineq(p), _norm_ineq(g)
    no_vars = not any(_meta(t)[0] for t in p[2] + g[2])
    if np_ is not None and ng is not None:
        (pp, sp_), (pg, sg) = np_, ng
        if sp_ != sg:
            return False, "structure"
        if len(pp) == 2 and not no_vars:
            return o.prop(_diff(pp[1], pp[0]), _diff(pg[1], pg[0]), True)
        return _all(o.scalar(a, b) for a, b in zip(pp, pg))
    if np_ is not None or ng is not None or p[1] != g[1]:
        return False, "structure"
    if len(p[1]) == 1 and not no_vars:
        ap, ag = _assignment(p), _assignment(g)
        if ap is not None and ag is not None and not _meta(ap)[0] and not _meta(ag)[0]:
            names = _assigned_name(p), _assigned_name(g)
            labelled = names[0].startswith("label ") or names[1].startswith("label ")
            if (nested or labelled) and names[0] != names[1]:
                return False, "structure"  # in `x=1, y=2` the names matter, and so do labels: `AB=5` != `CD=5`
            return o.scalar(ap, ag)  # a whole answer `x = 5` vs `y = 5`: both just say "5"
        return o.prop(_diff(*p[2]), _diff(*g[2]), False)
    return _all(o.scalar(a, b) for a, b in zip(p[2], g[2]))


def _as_union(v: tuple) -> tuple | None:
    if v[0] == "union":
        return v[1]
    if v[0] == "list":
        items = tuple(_as_interval(x) for x in v[1])
        return None if any(x is None for x in items) else items
    return None


def _cmp(p: tuple, g: tuple, o: _Oracle, nested: bool = False) -> tuple[bool | None, str]:
    """Three-valued comparison of two analysed values: True / False / None (needs the worker).
    `nested`: p and g are items of a list/tuple/set/matrix."""
    kp, kg = p[0], g[0]
    if kp == "bad" or kg == "bad":
        if p == g and p[1]:  # the same unparsable text: `Q(2,-2)`
            return True, "exact"
        return False, "unparsable"
    if kp == "expr" and kg == "expr":
        return o.scalar(p[1], g[1])
    if kp == "text" or kg == "text":
        return (True, "exact") if p == g else (False, "different")
    if kp == "rel" or kg == "rel":
        if kp == kg:
            return _rel_vs_rel(p, g, o, nested)
        rel, other = (p, g) if kp == "rel" else (g, p)
        value = _assignment(rel)
        if value is None:
            value = _chain_value(rel)  # compared with a value, a chain states its last one
        if value is not None:
            return _cmp(("expr", value), other, o) if kp == "rel" else _cmp(other, ("expr", value), o)
        if other[0] in ("interval", "paren2"):
            ip, ig = _as_interval(p), _as_interval(g)
            if ip is not None and ig is not None:
                return _cmp_interval(ip, ig, o)
        return False, "structure"
    if kp == "ratio" or kg == "ratio":  # term by term, as written: `2:5` != `4:10` != `\\frac{2}{5}`
        if kp != kg or len(p[1]) != len(g[1]):
            return False, "structure"
        return _all(o.scalar(x, y) for x, y in zip(p[1], g[1]))
    if kp == "matrix" or kg == "matrix":
        if kp != kg or len(p[1]) != len(g[1]) or len(p[1][0]) != len(g[1][0]):
            return False, "structure"
        return _all(_cmp(x, y, o, True) for rp, rg in zip(p[1], g[1]) for x, y in zip(rp, rg))
    if kp == "union" or kg == "union":
        up, ug = _as_union(p), _as_union(g)
        if up is None or ug is None:
            return False, "structure"
        return _unordered(up, ug, o, multiset=False)
    if kp == "interval" or kg == "interval":
        ip, ig = _as_interval(p), _as_interval(g)
        if ip is None or ig is None:
            return False, "structure"
        return _cmp_interval(ip, ig, o)
    if kp == "set" or kg == "set":
        cp = p[1] if kp in ("set", "list") else (p,) if kp == "expr" else None
        cg = g[1] if kg in ("set", "list") else (g,) if kg == "expr" else None
        if cp is None or cg is None:
            return False, "structure"
        return _unordered(cp, cg, o, multiset=False)
    if kp in ("tuple", "paren2") or kg in ("tuple", "paren2"):
        if kp not in ("tuple", "paren2", "list") or kg not in ("tuple", "paren2", "list"):
            return False, "structure"
        if len(p[1]) != len(g[1]):
            return False, "structure"
        return _all(_cmp(x, y, o, True) for x, y in zip(p[1], g[1]))
    if kp == "list" and kg == "list":
        return _unordered(p[1], g[1], o, multiset=True)
    return False, "structure"


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


# ------------------------------------------------------------------------------------ worker process
_FRAME = struct.Struct(">I")


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_frame(fd: int, buf: bytearray) -> Any:
    """Blocking read of one frame (worker side); None on EOF."""
    while True:
        if len(buf) >= 4:
            (n,) = _FRAME.unpack_from(buf)
            if len(buf) >= 4 + n:
                obj = pickle.loads(bytes(buf[4:4 + n]))
                del buf[:4 + n]
                return obj
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buf += chunk


def _has_dec(node: tuple) -> bool:
    return _meta(node)[2]


def _to_sympy(node: tuple, sp: Any) -> Any:
    tag = node[0]
    if tag == "n":
        q = node[1]
        return sp.Rational(q.numerator, q.denominator)
    if tag == "v":
        return sp.Symbol(node[1])
    if tag == "c":
        return {"pi": sp.pi, "e": sp.E, "i": sp.I, "inf": sp.oo}[node[1]]
    if tag == "neg":
        return -_to_sympy(node[1], sp)
    if tag == "+":
        return sp.Add(*[_to_sympy(t, sp) for t in node[1]])
    if tag == "*":
        return sp.Mul(*[_to_sympy(t, sp) for t in node[1]])
    if tag == "/":
        return _to_sympy(node[1], sp) / _to_sympy(node[2], sp)
    if tag == "^":
        b, e = _to_sympy(node[1], sp), _to_sympy(node[2], sp)
        if e.is_Rational and _expanded_bits(b, sp) * abs(e) > WORKER_MAX_BITS:
            raise _TooLarge("power")  # sympy would expand it: 9^(9^9), sqrt(2)^(10^9) = 2^(5*10^8)
        return sp.Pow(b, e)
    if tag == "root":
        x, n = _to_sympy(node[1], sp), _to_sympy(node[2], sp)
        if n.is_Integer and n > 0 and n % 2 == 1 and not x.free_symbols:
            return sp.real_root(x, n)
        return sp.root(x, n)
    if tag == "f":
        x = _to_sympy(node[2], sp)
        fn = {"abs": sp.Abs, "floor": sp.floor, "ceil": sp.ceiling, "sqrt": sp.sqrt, "sin": sp.sin,
              "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc, "asin": sp.asin,
              "acos": sp.acos, "atan": sp.atan, "acot": sp.acot, "asec": sp.asec, "acsc": sp.acsc,
              "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "coth": sp.coth, "exp": sp.exp}[node[1]]
        return fn(x)
    if tag == "log":
        x = _to_sympy(node[2], sp)
        return sp.log(x) if node[1] is None else sp.log(x, _to_sympy(node[1], sp))
    if tag in ("!", "binom"):
        args = [_to_sympy(t, sp) for t in node[1:]]
        if any(a.is_Number and abs(a) > 10 ** 4 for a in args):
            raise _TooLarge(tag)
        return sp.factorial(args[0]) if tag == "!" else sp.binomial(args[0], args[1])
    raise _Unparsable(tag)


def _expanded_bits(b: Any, sp: Any) -> int:
    """Bits of the rational numbers that sympy multiplies out when `b` is raised to a rational power:
    the rational factors of `b` and the bases of its rational powers (`2*sqrt(3)`), weighted."""
    bits = 0
    for f in sp.Mul.make_args(b):
        if f.is_Rational and f not in (0, 1, -1):
            bits += max(int(f.p).bit_length(), int(f.q).bit_length())
        elif f.is_Pow and f.base.is_Rational and f.exp.is_Rational and f.base not in (0, 1, -1):
            size = max(int(f.base.p).bit_length(), int(f.base.q).bit_length())
            bits += int(size * abs(f.exp)) + 1
    return bits


@lru_cache(maxsize=1024)
def _w_point(name: str, k: int) -> tuple[int, int]:
    rng = random.Random(f"w|{name}|{k}")
    num = rng.randint(200, 3000) * (1 if k % 2 == 0 else -1) * (1 if rng.random() < 0.7 else -1)
    return num, rng.randint(900, 1100)


def _w_values(exprs: list, syms: list, k: int, sp: Any) -> list | None:
    subs = {s: sp.Rational(*_w_point(s.name, k)) for s in syms}
    out = []
    for ex in exprs:
        v = ex.evalf(30, subs=subs)
        if not v.is_number or v.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            return None
        out.append(v)
    return out


def _w_equal(a: Any, b: Any, dec: bool, rel_tol: float, sp: Any) -> bool:
    if a == b:
        return True
    free = a.free_symbols | b.free_symbols
    if not free:
        if a.is_Rational and b.is_Rational:
            if not dec or a.is_Integer or b.is_Integer:
                return False
            return bool(abs(a - b) <= sp.Rational(repr(rel_tol)) * sp.Max(abs(a), abs(b)))
        if any(x.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for x in (a, b)):
            return bool(sp.simplify(a - b) == 0) if not (a.has(sp.nan) or b.has(sp.nan)) else False
        va, vb, d = a.evalf(30), b.evalf(30), (a - b).evalf(30)
        if not (va.is_number and vb.is_number and d.is_number):
            return bool(sp.simplify(a - b) == 0)
        mag = sp.Max(abs(va), abs(vb))
        if dec:
            return bool(abs(d) <= rel_tol * mag or abs(d) <= sp.Float("1e-12"))
        if abs(d) <= sp.Float("1e-20", 30) * mag or d == 0:
            return True
        if abs(d) > sp.Float("1e-12", 30) * mag:
            return False
        return bool(sp.simplify(a - b) == 0)
    syms = sorted(free, key=lambda s: s.name)
    agree = 0
    for k in range(6):
        vals = _w_values([a, b], syms, k, sp)
        if vals is None:
            continue
        va, vb = vals
        d = abs(va - vb)
        if d <= sp.Float("1e-18", 30) * sp.Max(abs(va), abs(vb)) + sp.Float("1e-25", 30):
            agree += 1
            if agree >= 3:
                break
        else:
            return False
    if agree >= 2:
        return True
    return bool(sp.simplify(a - b) == 0)


def _w_prop(d1: Any, d2: Any, positive: bool, sp: Any) -> bool:
    syms = sorted(d1.free_symbols | d2.free_symbols, key=lambda s: s.name)
    ratios = []
    for k in range(6):
        vals = _w_values([d1, d2], syms, k, sp)
        if vals is None:
            continue
        v1, v2 = vals
        tiny = sp.Float("1e-25", 30)
        if abs(v1) <= tiny and abs(v2) <= tiny:
            continue
        if abs(v1) <= tiny or abs(v2) <= tiny:
            return False
        ratios.append(v1 / v2)
    if len(ratios) >= 2:
        r0 = ratios[0]
        if any(abs(r - r0) > sp.Float("1e-18", 30) * abs(r0) for r in ratios[1:]):
            return False
        if positive:
            return bool(abs(sp.im(r0)) <= sp.Float("1e-20", 30) * abs(r0) and sp.re(r0) > 0)
        return True
    q = sp.simplify(d1 / d2)
    if q.free_symbols or q == 0 or not q.is_number:
        return False
    return bool(q > 0) if positive else True


def _w_task(task: tuple, rel_tol: float, sp: Any) -> tuple[bool | None, str]:
    try:
        if task[0] == "_sleep":  # test hook for the time limit
            time.sleep(task[1])
            return True, "symbolic"
        a, b = _to_sympy(task[1], sp), _to_sympy(task[2], sp)
        if task[0] == "eq":
            ok = _w_equal(a, b, _has_dec(task[1]) or _has_dec(task[2]), rel_tol, sp)
        else:
            ok = _w_prop(a, b, task[3], sp)
        return bool(ok), "symbolic"
    except (_TooLarge, RecursionError, _Unparsable):
        return None, "unparsable"
    except Exception:  # noqa: BLE001 - any sympy failure is an answer ("error"), never a dead worker
        return None, "error"


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(0)


def _worker_main() -> None:
    """Entry point of a worker process: frames in on stdin, frames out on the original stdout."""
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    try:
        import resource

        limit = int(os.environ.get("MATHCTL_GRADER_WORKER_MEM_MB", "2048")) << 20
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    warnings.simplefilter("ignore")
    import sympy

    _write_frame(out_fd, ("ready", os.getpid()))
    buf = bytearray()
    while True:
        msg = _read_frame(0, buf)
        if msg is None:
            return
        job_id, rel_tol, tasks = msg
        answers = [_w_task(t, rel_tol, sympy) for t in tasks]
        _write_frame(out_fd, (job_id, answers))


# -------------------------------------------------------------------------------------- worker pool
_BOOT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
         "from mathctl.grading.equivalence import _worker_main; _worker_main()")


def _default_workers() -> int:
    env = os.environ.get("MATHCTL_GRADER_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class _Worker:
    __slots__ = ("proc", "rfd", "wfd", "buf", "ready")

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the `mathctl` package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, bufsize=0, close_fds=True)
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        self.buf = bytearray()
        self.ready = False

    def send(self, obj: Any) -> bool:
        try:
            _write_frame(self.wfd, obj)
            return True
        except (OSError, ValueError):
            return False

    def frames(self) -> list | None:
        """Frames now readable (call after select says so); None when the worker is gone."""
        try:
            chunk = os.read(self.rfd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        self.buf += chunk
        out = []
        while len(self.buf) >= 4:
            (n,) = _FRAME.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        self.close_pipes()

    def close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """Worker processes shared by all threads of this process, plus a small verdict cache."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition(threading.Lock())
        self.idle: list[_Worker] = []
        self.all: set[_Worker] = set()
        self.count = 0  # workers alive or being started
        self.max_workers = _default_workers()
        self.cache: dict[tuple, tuple[bool, str]] = {}

    # -- verdict cache (symbolic verdicts only; timeouts are not cached)
    def cache_get(self, key: tuple) -> tuple[bool, str] | None:
        return self.cache.get(key)

    def cache_put(self, key: tuple, res: tuple[bool, str]) -> None:
        if res[1] in ("timeout", "error"):
            return
        with self.cond:
            if len(self.cache) >= 1 << 15:
                self.cache.clear()
            self.cache[key] = res

    # -- worker bookkeeping
    def _spawn(self) -> _Worker | None:
        try:
            w = _Worker()
        except OSError:
            with self.cond:
                self.count -= 1
                self.cond.notify_all()
            return None
        with self.cond:
            self.all.add(w)
        return w

    def acquire(self, n: int) -> list[_Worker]:
        spawn = 0
        got: list[_Worker] = []
        with self.cond:
            cap = max(self.max_workers, n)
            while True:
                while self.idle and len(got) < n:
                    got.append(self.idle.pop())
                while len(got) + spawn < n and self.count < cap:
                    self.count += 1
                    spawn += 1
                if got or spawn:
                    break
                self.cond.wait()
        for _ in range(spawn):
            w = self._spawn()
            if w is not None:
                got.append(w)
        return got

    def replace(self, w: _Worker) -> _Worker | None:
        """Kill `w` and start its successor (whose start-up runs while the caller goes on)."""
        w.kill()
        with self.cond:
            self.all.discard(w)
        return self._spawn()

    def release(self, workers: list[_Worker]) -> None:
        with self.cond:
            for w in workers:
                if w.alive():
                    self.idle.append(w)
                else:
                    self.count -= 1
                    self.all.discard(w)
                    w.close_pipes()
            self.cond.notify_all()

    def drop(self, w: _Worker) -> None:
        w.kill()
        with self.cond:
            self.count -= 1
            self.all.discard(w)
            self.cond.notify_all()

    def run(self, jobs: list[list[tuple]], timeout_s: float, parallel: int, rel_tol: float) -> list:
        """Answers per job (a list of (bool|None, reason) per task), or "timeout"/"error" per job."""
        results: list = [None] * len(jobs)
        workers = self.acquire(max(1, min(parallel, len(jobs))))
        if not workers:
            return ["error"] * len(jobs)
        idle = list(workers)
        queue = deque(range(len(jobs)))
        active: dict[int, list] = {}  # fd -> [worker, job index, deadline or None, start-up deadline]
        tries = [0] * len(jobs)
        try:
            while queue or active:
                while queue and idle:
                    w = idle.pop()
                    i = queue.popleft()
                    if not w.send((i, rel_tol, jobs[i])):
                        tries[i] += 1
                        if tries[i] >= 2:
                            results[i] = "error"
                        else:
                            queue.appendleft(i)
                        nw = self.replace(w)
                        if nw is not None:
                            idle.append(nw)
                        else:
                            self._forget()
                        continue
                    now = time.monotonic()
                    active[w.rfd] = [w, i, now + timeout_s if w.ready else None, now + _STARTUP_S]
                if not active:
                    for i in queue:
                        results[i] = "error"
                    break
                now = time.monotonic()
                wake = min(e[2] if e[2] is not None else e[3] for e in active.values())
                readable, _, _ = select.select(list(active), [], [], max(0.0, wake - now))
                for fd in readable:
                    entry = active[fd]
                    w, i = entry[0], entry[1]
                    frames = w.frames()
                    if frames is None:  # the worker died (crash, memory limit)
                        del active[fd]
                        results[i] = "error"
                        nw = self.replace(w)
                        if nw is not None:
                            idle.append(nw)
                        else:
                            self._forget()
                        continue
                    for fr in frames:
                        if fr[0] == "ready":
                            w.ready = True
                            entry[2] = time.monotonic() + timeout_s  # the clock starts now
                        elif fr[0] == i:
                            results[i] = fr[1]
                            del active[fd]
                            idle.append(w)
                now = time.monotonic()
                for fd, (w, i, deadline, startup) in list(active.items()):
                    if (deadline is not None and now >= deadline) or (deadline is None and now >= startup):
                        del active[fd]
                        results[i] = "timeout" if deadline is not None else "error"
                        nw = self.replace(w)
                        if nw is not None:
                            idle.append(nw)
                        else:
                            self._forget()
        except BaseException:
            for entry in active.values():
                self.drop(entry[0])
            active.clear()
            raise
        finally:
            self.release(idle)
        return results

    def _forget(self) -> None:
        with self.cond:
            self.count -= 1
            self.cond.notify_all()

    def shutdown(self) -> None:
        with self.cond:
            workers = list(self.all)
            self.all.clear()
            self.idle.clear()
            self.count = 0
            self.cond.notify_all()
        for w in workers:
            try:
                w.proc.stdin.close()  # EOF: the worker exits on its own
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
            w.close_pipes()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_ABANDONED: list[_Worker] = []  # workers inherited over fork: kept referenced, never touched


def _get_pool() -> _Pool:
    global _POOL
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        return pool
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool()
        return _POOL


def _after_fork_in_child() -> None:
    """A forked child must not talk to (or keep open the pipes of) its parent's workers."""
    global _POOL, _POOL_LOCK
    old = _POOL
    _POOL = None
    _POOL_LOCK = threading.Lock()
    if old is not None:
        for w in list(old.all):
            w.close_pipes()
            _ABANDONED.append(w)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start_workers(n: int | None = None) -> int:
    """Start (and wait for) `n` workers now (default: the CPU count), e.g. before timing-sensitive work.
    Returns the number of ready workers."""
    pool = _get_pool()
    n = n or pool.max_workers
    got = pool.acquire(n)
    deadline = time.monotonic() + _STARTUP_S
    ready = []
    try:
        for w in got:
            while not w.ready and time.monotonic() < deadline:
                r, _, _ = select.select([w.rfd], [], [], max(0.0, deadline - time.monotonic()))
                frames = w.frames() if r else []
                if frames is None:
                    break
                if any(f[0] == "ready" for f in frames):
                    w.ready = True
            if w.ready:
                ready.append(w)
    finally:
        pool.release(got)
    return len(ready)


def shutdown_workers() -> None:
    """Stop this process's workers (they are restarted on demand). Also runs at interpreter exit."""
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown_workers)
