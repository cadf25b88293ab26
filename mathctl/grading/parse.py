"""Stages 1-2 of `equivalence`: cheap cleanup of an answer string (`_clean`) and our own recursive-descent
parser from LaTeX to small tuple trees (`_parse_scalar`), with the size limits that bound both.

No sympy, no `eval`. See the module docstring of `mathctl.grading.equivalence` for what is understood.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

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
