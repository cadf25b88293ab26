"""Stage 4 of `equivalence`: in-process evaluation of parsed trees. Exact rationals (`Fraction`), floats
(`math`/`cmath`), values modulo a prime for the `identity` test, 40-digit `decimal` magnitudes for huge closed
forms; `_scalar_inproc` / `_prop_inproc` answer True, False or None (None: sympy must decide).

The tolerance policy is stated in the module docstring of `mathctl.grading.equivalence`.
"""

from __future__ import annotations

import cmath
import decimal
import math
import random
from fractions import Fraction
from functools import lru_cache
from typing import Any

from mathctl.grading.parse import (
    _EVAL_ERRORS,
    _IDENTITY_POINTS,
    _INF,
    _NA,
    MAX_BITS,
    MAX_FACTORIAL,
    _HasVars,
    _neg,
    _NotRational,
    _TooLarge,
    _Undefined,
    _Unparsable,
)

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
