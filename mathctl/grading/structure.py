"""Stage 3 of `equivalence`: an answer string analysed into a value (`_analyze`: scalar, list, set, tuple,
interval, union, matrix, relation, ratio, text) and two values compared (`_cmp`) with three-valued results,
scalar questions going to an `_Oracle` that answers in-process or collects them for the sympy workers.

The tuple/set/interval/relation/label rules are stated in the module docstring of
`mathctl.grading.equivalence`.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from mathctl.grading.numeric import _diff, _meta, _prop_inproc, _scalar_inproc
from mathctl.grading.parse import (
    _IN_PREFIX_RE,
    _INF,
    _LABEL_LHS_RE,
    _MATRIX_RE,
    _NAME_RE,
    _THOUSANDS_RE,
    MAX_CHARS,
    MAX_DEPTH,
    MAX_UNORDERED,
    _parse_scalar,
    _Text,
    _TooLarge,
    _Unparsable,
)

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
                return False, "structure"  # names matter in `x=1, y=2`, and labels do: `AB=5` != `CD=5`
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
