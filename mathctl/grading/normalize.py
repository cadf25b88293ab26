"""Canonical string form of a math answer, for exact comparison and as input to the symbolic stage.

`normalize_answer(text)` rewrites an answer (a gold answer, or what `extract_answer` found in a response)
into one spelling, so that `normalize_answer(a) == normalize_answer(b)` catches the many answers that
differ only in notation, and `mathctl.grading.equivalence` gets LaTeX it can parse. LaTeX structure
(`\\frac{a}{b}`, `\\sqrt{2}`, `^`, `\\pi`, `\\infty`, intervals, tuples, `\\{...\\}` sets, matrices) is
kept, with one spelling for each thing. It is pure Python, runs in about linear time, never raises, and
caches short inputs (gold answers are normalised once per sample). Inputs over 20,000 characters are not
answers and only get `$` and whitespace removed (the longest benchmark gold answer has ~3,800).

Output contract (for the equivalence stage): no math delimiters, no thousands separators (every comma
left is a separator), no whitespace except one space after a command name before a letter (`\\sin x`) and
one after a comma that would otherwise read as a thousands separator (`48, 384`, see below), braced
`\\frac`/`\\sqrt`/`\\binom` arguments and scripts. Normalising a normalised answer changes nothing (checked
on every gold answer of the benchmarks; not promised for arbitrary garbage).

Policies, in the order they are applied:

- Data repairs: a control character that a JSON escape made out of a LaTeX backslash is turned back:
  form feed + letter -> `\\f...` (`\\frac`), tab + letter -> `\\t...` (`\\times`, `\\text`, `\\tfrac`),
  backspace + letter -> `\\b...`, carriage return + letter -> `\\r...` (`\\right`), and newline + `eq`,
  `eg`, `abla`, `ot`, `otin`, `leq`, `geq`, `mid`, `subset`, `subseteq`, `parallel`, `exists` -> `\\n...`
  (other newlines are real line breaks). Common Unicode math (`−`, `π`, `∞`, `√`, `≤`, `×`, `²`, `°`,
  no-break and thin spaces, full-width `，：（）％`) becomes ASCII/LaTeX.
- Math delimiters `$`, `$$`, `\\(`, `\\)`, `\\[`, `\\]` are removed wherever they occur (`$2$, $3$` ->
  `2,3`); an escaped `\\$` is currency (below). `\\left`, `\\right`, `\\middle`, `\\big` ... `\\Biggr` are
  dropped, and so is the null delimiter of `\\left.` / `\\right.`.
- Spacing `\\!` is removed; `\\,` `\\:` `\\;` `\\>` `\\ ` `~` `\\quad` `\\qquad` `\\hspace{..}`,
  `\\phantom{..}` and the like, and `\\displaystyle`-style switches, become a space (spaces are removed
  later, see below).
- One spelling per command: `\\dfrac` `\\tfrac` `\\cfrac` -> `\\frac`; `\\dbinom` `\\tbinom` -> `\\binom`;
  `\\le` `\\leqslant` `\\leqq` -> `\\leq` (same for `\\ge`); `\\ne` -> `\\neq`; `\\lbrace`/`\\rbrace`
  -> `\\{`/`\\}`; `\\lt`/`\\gt` -> `<`/`>`; `\\varnothing`/`\\oslash` -> `\\emptyset`; `\\dots`/`\\cdots`
  -> `\\ldots`; `{,}` -> `,`; `bmatrix` and `[`/`(` + `array`/`matrix` + `]`/`)` -> `pmatrix`.
- Unbalanced braces are repaired (after trailing punctuation goes): a `}` that closes nothing is dropped
  and missing `}` are added at the end (6 omni-math gold answers lack their last brace, e.g.
  `\\frac{5055}{2^{15}`; a truncated `\\boxed{5` in a response statement becomes `5`).
- Ordinals `5^{\\text{th}}`, `5th` -> `5`. Degrees are dropped: `^\\circ`, `^{\\circ}`, `{}^\\circ`, `°`,
  `\\degree`, and the unit word "degrees" (30^\\circ == 30). Radians are not converted.
- Percent: `\\%` and `%` are dropped, so `50\\%` == `50`. This stage does NOT make `0.5` equal to `50\\%`
  (they normalise to `0.5` and `50`); whether a fraction may match a percentage is for the equivalence
  stage to decide.
- Currency: `\\$` (and `\\textdollar`), `€`, `£`, `¥`, `₹` are dropped: `\\$5` == `5` == `5 €`; the words
  dollars/cents/... are units. A metric unit with a Unicode power after a number (`12 m²`, `3 cm³`) is dropped.
- Words joining answers, `\\text{ and }`, `\\text{ or }` and plain " and " / " or ", become a comma:
  `19 \\text{ and } 43` == `19, 43` (both `19,43`), `x=1 \\text{ or } x=2` -> `1,2`.
- Units. (a) Trailing `\\text{..}`/`\\mbox{..}`/`\\mathrm{..}` groups after a quantity (math ending in a
  digit, `}`, `)`, `]`, `!`, `\\pi` or `\\infty`) are a unit or a label and are dropped, with any `^2` and
  any `/`, `-`, `\\cdot` glue between them: `5 \\text{ cm}`, `10\\text{ dollars}`, `18\\text{ ways.}`,
  `440\\text{ cm}^2`, `0.05 \\mathrm{~N}-\\mathrm{m}` -> the number. Such a group must hold 1-4 plain
  words (no digits or parentheses), and it is kept when it is `a.m.`/`p.m.` (`9\\text{ a.m.}` keeps its
  meaning), a lone `i`/`e` (`2\\mathrm{i}`), or states a condition (`n \\text{ is even}`).
  (b) A known unit word (cm, km, inches, feet, miles, units, square units, kg, pounds, hours, minutes,
  seconds, days, years, dollars, cents, degrees, percent, mph, km/h, ... see `_UNIT_WORDS`) at the end,
  after a number, `}` or `)`, is dropped: `5 cm`, `12 sq units`, `4 \\frac{4}{9} days`. One-letter units
  (m, g, s, h) are only dropped inside `\\text`/`\\mathrm` (rule a), since bare they are variables.
  (c) A plain number followed by one to four words (`5 apples`, `9 (apples)`, `42 (pounds of sand)`)
  becomes the number, unless a word is a math word (`2 pi` stays) or the words are am/pm.
- `\\text`, `\\textbf`, `\\mbox`, `\\mathrm`, `\\mathbf`, `\\boldsymbol`, `\\operatorname`, `\\boxed` and the
  like are unwrapped (content kept): `\\text{Yes}` -> `yes` (see case), `\\mathbf{v}` -> `v`.
  `\\mathbb`, `\\mathcal` are kept (`\\mathbb{R}`).
- Thousands separators: `1,234,567` -> `1234567` only for strict groups (a first group of 1-3 digits not
  starting with 0, then groups of exactly 3 digits, no space after the comma, no other digit group
  following), and not when the number alone fills parentheses/brackets (`[1,500]` stays an interval,
  `(1,000)` the point `(1,0)`). `1\\,000`, `1{,}000`, `1 000`, `40,\\!000` -> `1000`/`40000`.
  `(1, 2)`, `1,2,3`, `10,11,12` are lists. `100,200,300` is read as one number (ambiguous; strict rule).
  Because spaces go, a list comma between digit groups that look like thousands keeps one space after
  it in the output (`40, 150` -> `40, 150`, `[1,500]` -> `[1, 500]`), so the output is stable and a list
  of two numbers never equals a number.
- Whitespace: all removed (LaTeX math ignores it), except one space between a command name and a
  following letter, which is needed (`\\sin x`, `\\pi r`). So `Quadrant I` -> `quadranti`.
- Case: runs of two or more letters outside command names are lowercased (`Yes`, `YES`, `\\text{No}`,
  `Friday` -> `yes`/`no`/`friday`; also `AB` -> `ab`); single letters keep their case, so `x` and `X`,
  `e` and `E` stay different variables. A parenthesised single letter (any letter, the usual choice
  label) becomes that letter in upper case: `(C)`, `(c)`, `\\text{(C)}`, `(\\text{C})` -> `C`; a bare `C`
  stays `C` and a bare `c` stays `c`.
- Braces: `\\frac12` `\\frac1{2}` `\\frac{1}2` -> `\\frac{1}{2}`, `\\frac ab` -> `\\frac{a}{b}`, `\\sqrt2` ->
  `\\sqrt{2}`, `\\sqrt[3]2` -> `\\sqrt[3]{2}`, same for `\\binom`; a one-token argument is one digit, one
  letter or one command (`\\frac123` is `\\frac{1}{2}3`, as in LaTeX). Scripts are always braced: `x^2`
  -> `x^{2}`, `x_1` -> `x_{1}`, `10^-3` -> `10^{-3}`; a digit run after `^`/`_` is taken whole (`2^10`
  -> `2^{10}`, what a plain-text writer means, though LaTeX would read `2^{1}0`). A pair of braces around
  the whole answer is removed (`{5}` -> `5`).
- Equations: a leading `v=` or `v\\approx` is removed when `v` is one letter (optionally subscripted or
  primed), a Greek-letter command, or a tuple of letters `(a,b)`, and the right side is constant: no
  letters except `e` and `i` and no Greek letters except `\\pi` (`x=3` -> `3`, `y=\\frac12` ->
  `\\frac{1}{2}`, `(j,k)=(2019,1010)` -> `(2019,1010)`, but `y=2x+1`, `f(x)=\\frac{1}{x}`, `N=n` stay).
  This is done for each top-level comma item (`x=1,x=2` -> `1,2`). A whole answer `v \\in S` becomes `S`
  (`x \\in [0, 1]` -> `[0,1]`), whatever `S` is.
- Numbers: `.5` -> `0.5`, leading zeros `025` -> `25`, trailing decimal zeros `1.50` -> `1.5`, `27.0` ->
  `27`; a `+` at the start or after `(`, `[` or `,` is dropped (`+\\infty` -> `\\infty`). `0.5` and
  `\\frac{1}{2}` stay different strings (equivalence decides).
- Punctuation: trailing `.`, `,`, `;`, `:` and `\\\\`, a leading `:`/`,`, and repeated commas are removed.
  `!` stays (factorial).

Not covered, on purpose or for now: choice label plus value (`\\textbf{(C)}\\ 12` -> `(C)12`, matching
neither `C` nor `12`); mixed numbers (`4\\frac{4}{9}` reads as a product); unit conversion (`50 cents`
vs `\\$0.50`, minutes vs hours); `\\cdot` vs `\\times`; `a/b` vs `\\frac{a}{b}`; set/list order; words
that annotate items of a list (`4122 \\text{ (min)}, 6049 \\text{ (max)}`); `\\text{ OR }` between two
forms of one value (it becomes a list); Greek letters in Unicode; prose answers (kept as lowercased
run-together words, so they match only when written identically). The equivalence stage handles the
numeric and symbolic cases.
"""

from __future__ import annotations

import re
from functools import lru_cache

from mathctl.grading.extract import matching_braces

__all__ = ["normalize_answer", "strip_math_delimiters"]

# Inputs up to this length are cached (gold answers repeat for every sample of a prompt, and answers
# repeat across samples); the bound keeps the cache's memory small (65,536 entries of at most 256 chars).
_CACHE_MAX_LEN = 256
# Longer inputs get only delimiter and whitespace removal (see normalize_answer).
_FULL_MAX_LEN = 20_000
# Unit rules only look at the end of the answer; bounding the window bounds their regex cost.
_TAIL_WINDOW = 300

# ---------------------------------------------------------------------------------------------------------
# Repairs and character-level rewrites

_CONTROL_RE = re.compile(
    r"[\x08\x0c\t\r](?=[A-Za-z])"
    r"|\n(?=(?:eq|eg|abla|otin|ot|leq|geq|mid|subset|subseteq|parallel|exists)(?![A-Za-z]))"
)
_CONTROL_FIX = {"\x08": "\\b", "\x0c": "\\f", "\t": "\\t", "\r": "\\r", "\n": "\\n"}
_UNICODE = str.maketrans({
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u221e": "\\infty ", "\u03c0": "\\pi ", "\u221a": "\\sqrt ",
    "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ", "\u00f7": "\\div ", "\u2264": "\\leq ",
    "\u2265": "\\geq ", "\u2260": "\\neq ", "\u222a": "\\cup ", "\u2229": "\\cap ", "\u2208": "\\in ",
    "\u2205": "\\emptyset ", "\u00b0": "", "\u00b2": "^{2}", "\u00b3": "^{3}", "\u00bd": "\\frac{1}{2}",
    "\u00bc": "\\frac{1}{4}", "\u00be": "\\frac{3}{4}", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    "\u3000": " ", "\u200b": "", "\uff0c": ",", "\uff1a": ":", "\uff08": "(", "\uff09": ")", "\uff05": "%",
    "\u20ac": "", "\u00a3": "", "\u00a5": "", "\u20b9": "",  # currency signs, like `\\$`
})
# A metric unit with a Unicode power after a quantity, at the end: `12 m²`, `3 cm³` (bare `m` is a variable,
# but `m²` after a number is a unit).
_POWER_UNIT_RE = re.compile(r"(?<=[\d}) ])\s*(?:[cmkd]?m|ft|in)[\u00b2\u00b3]\s*\.?\s*$")

# In every pattern below that looks at commands, `\\\\` (a LaTeX line break) is matched first and kept, so
# `\\,` is read as line break + comma, never as a thin space.
_DELIM_RE = re.compile(r"(\\\\|\\\$)|\\[()\[\]]|\$")  # group 1 is kept
_LEFT_RIGHT_RE = re.compile(r"\\\\|\\(?:left|right|middle|[bB]igg?[lrm]?)(?![A-Za-z])\s*\.?")
_SPACING_RE = re.compile(
    r"\\\\|\\!\s*|\\[,:;>\s]|~|\\q?quad(?![A-Za-z])"
    r"|\\(?:en|thin|med|thick|negthin|negmed|negthick)space(?![A-Za-z])"
    r"|\\(?:[hv]space\*?|phantom|hphantom|vphantom)\{[^{}]*\}"
    r"|\\(?:hfill|displaystyle|textstyle|scriptstyle|scriptscriptstyle|limits|nolimits)(?![A-Za-z])"
)
_SPACES_RE = re.compile(r"\s+")
# `\\{`, `\\}` (set braces) and `\\\\` are single tokens, so only group braces count as braces.
_BRACE_TOKEN_RE = re.compile(r"\\[\\{}]|[{}]")
_COMMAND_RE = re.compile(r"\\\\|\\([A-Za-z]+)")
_RENAMES = {
    "dfrac": "\\frac", "tfrac": "\\frac", "cfrac": "\\frac", "dbinom": "\\binom", "tbinom": "\\binom",
    "le": "\\leq", "leqslant": "\\leq", "leqq": "\\leq", "ge": "\\geq", "geqslant": "\\geq", "geqq": "\\geq",
    "ne": "\\neq", "lbrace": "\\{", "rbrace": "\\}", "lt": "<", "gt": ">", "varnothing": "\\emptyset",
    "oslash": "\\emptyset", "dots": "\\ldots", "cdots": "\\ldots", "degree": "", "textdegree": "",
    "textdollar": "", "colon": ":",
}
_ORDINAL_RE = re.compile(
    r"\^ ?\{? ?\\(?:text|textrm|mathrm|mbox) ?\{ ?(?:st|nd|rd|th) ?\} ?\}?|(?<=\d)(?:st|nd|rd|th)(?![A-Za-z])"
)
_DEGREE_RE = re.compile(r"(?:\{ ?\})? ?\^ ?(?:\{ ?\\circ ?\}|\\circ(?![A-Za-z]))")
_PERCENT_DOLLAR_RE = re.compile(r"\\\\|\\[%$]|%")

# ---------------------------------------------------------------------------------------------------------
# Words, units and text groups

_TEXT_CMD = r"\\(?:text(?:rm|bf|it|sf|normal|up)?|mbox|mathrm|operatorname)"
_TEXT_CONJ_RE = re.compile(_TEXT_CMD + r" ?\{ ?(?i:and|or|,) ?\}")
_PLAIN_CONJ_RE = re.compile(r" (?i:and|or) ")
# One trailing unit group, with an optional `^2` / `^{-1}` exponent and glue before the next group.
_UNIT_GROUP = _TEXT_CMD + r" ?\{([A-Za-z .~/'\-]{1,40})\}"
_UNIT_GROUP_RE = re.compile(_UNIT_GROUP)
_TEXT_UNIT_RUN_RE = re.compile(
    r"(?:" + _UNIT_GROUP + r"(?: ?\^ ?(?:\{ ?-?\d ?\}|-?\d))? ?(?:(?:/|-|\\cdot|\\times) ?)?)+[ .]*$"
)
# Words that make a trailing text group a condition or a statement, not a unit.
_CONDITION_WORDS = frozenset(
    "is are be for all any every each if when where only odd even prime integer integers real positive "
    "negative such that with not no none exists otherwise or and unless undefined".split()
)
_UNIT_WORDS = (
    "millimeters millimetres millimeter millimetre centimeters centimetres centimeter centimetre "
    "kilometers kilometres kilometer kilometre meters metres meter metre inches inch feet foot ft "
    "yards yard yd miles mile mm cm km units unit liters litres liter litre ml gallons gallon cups "
    "kilograms kilogram kg grams gram mg pounds pound lbs lb ounces ounce oz tons ton "
    "seconds second secs sec minutes minute mins min hours hour hrs hr days day weeks week months month "
    "years year yrs dollars dollar cents cent euros euro yuan mph kph kmh km/h km/hr m/s ft/s mi/h "
    "degrees degree deg radians radian rad percent"
).split()
_UNIT_WORD = (
    r"(?:(?:square|sq\.?|cubic|cu\.?) ?)?(?:" + "|".join(_UNIT_WORDS) + r")(?![A-Za-z])(?: ?\^ ?\{?[23]\}?)?"
)
_PLAIN_UNIT_RE = re.compile(
    r"(?<=[0-9}) ])" + _UNIT_WORD + r"(?:(?: ?/ ?| per )" + _UNIT_WORD + r")? ?\.?$", re.I
)
_NUMBER_WORDS_RE = re.compile(
    r"([-+]?\d[\d,]*(?:\.\d+)?) \(?([A-Za-z][A-Za-z'.\-]*(?: [A-Za-z][A-Za-z'.\-]*){0,3})\)?\.?"
)
# Words after a number that are mathematics, not a unit or a count noun.
_MATH_WORDS = frozenset(
    "pi sqrt sin cos tan cot sec csc log ln exp mod times plus minus over squared cubed divided root roots "
    "and or to am pm".split()
)
_UNWRAP_RE = re.compile(
    r"\\\\|\\(?:text(?:rm|bf|it|sf|tt|normal|up)?|mbox|hbox|math(?:rm|bf|it|sf|tt|normal)|boldsymbol|bm"
    r"|operatorname\*?|boxed|fbox|emph) ?\{"
)

# ---------------------------------------------------------------------------------------------------------
# Numbers, spelling and structure

_THOUSANDS_RE = re.compile(r"(?<![\d,.])([1-9]\d{0,2})((?:,\d{3})+)(?!\d)(?!,\d)")
_WS_RE = re.compile(r"(\\[A-Za-z]+) (?=[A-Za-z])| ")
_CASE_RE = re.compile(
    r"\\\\|\\(?:begin|end|mathbb|mathcal|mathfrak|mathscr)\{[^{}]*\}|\\[A-Za-z]+|([A-Za-z]{2,})"
)
_MATRIX_OPEN_RE = re.compile(r"[(\[]\\begin\{(?:array\}\{[lcr|]*|matrix)\}")
_MATRIX_CLOSE_RE = re.compile(r"\\end\{(?:array|matrix)\}[)\]]")
_ARG_CMD_RE = re.compile(r"\\\\|\\(frac|binom|sqrt)(?![A-Za-z])")
_ONE_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_SCRIPT_RE = re.compile(r"\\\\|([\^_]) ?(-?\d+(?:\.\d+)?|[A-Za-z]|\\(?!(?:begin|end)(?![A-Za-z]))[A-Za-z]+)")
_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho varrho "
    "sigma varsigma tau upsilon phi varphi chi psi omega "
    "Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega"
).split()
# A variable on the left of `=`: `x`, `x_{1}`, `x'`, `\\theta`, `\\theta_{0}`, or a tuple `(a,b)`.
_LHS = (
    r"(?:[A-Za-z](?:_\{[A-Za-z0-9]*\})?'*"
    r"|\\(?:" + "|".join(_GREEK) + r")(?![A-Za-z])(?:_\{[A-Za-z0-9]*\})?"
    r"|\([A-Za-z](?:,[A-Za-z])+\))"
)
_EQ_RE = re.compile(_LHS + r"(?:=|\\approx(?![A-Za-z]))(.+)", re.S)
_IN_RE = re.compile(_LHS + r"\\in(?![A-Za-z])(.+)", re.S)
_ENV_NAME_RE = re.compile(r"\\(?:begin|end)\{[^{}]*\}")
_VARIABLE_LETTER_RE = re.compile(r"[A-DF-HJ-Za-df-hj-z]")  # any letter but e and i
_TOP_LEVEL_TOKEN_RE = re.compile(r"[()\[\]{},]")
_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")
_LEADING_DOT_RE = re.compile(r"(?<![\w.}])\.(?=\d)")
_LEADING_ZERO_RE = re.compile(r"(?<![\w.])0+(?=\d)")
_DECIMAL_RE = re.compile(r"(?<![\w.])(\d+)\.(\d+)(?![\d.])")
_INNER_PLUS_RE = re.compile(r"(?<=[(\[,])\+")
_COMMAS_RE = re.compile(r",{2,}")
_LIST_COMMA_RE = re.compile(r"(?<![\d.])(\d{1,3}),(?=\d{3}(?!\d))")


def strip_math_delimiters(text: str) -> str:
    """Remove the math-mode delimiters `$`, `$$`, `\\(`, `\\)`, `\\[`, `\\]` wherever they occur, then strip.

    An escaped `\\$` (currency) and the line break `\\\\` are kept. Never raises; non-strings give "".
    """
    if not isinstance(text, str):
        return ""
    if "\\" not in text:
        return text.replace("$", "").strip()  # the common case, without a regex
    return _DELIM_RE.sub(r"\1", text).strip()


def _keep_linebreak(replacement: str):
    """A re.sub callback that keeps `\\\\` and replaces every other match by `replacement`."""
    return lambda m: m.group() if m.group() == "\\\\" else replacement


def _rename_commands(s: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        return _RENAMES[name] if name in _RENAMES else m.group()

    return _COMMAND_RE.sub(repl, s)


def _spacing(s: str) -> str:
    def repl(m: re.Match) -> str:
        tok = m.group()
        if tok == "\\\\":
            return tok
        return "" if tok.startswith("\\!") else " "  # \! is a negative space: `40,\!000` is one number

    return _SPACING_RE.sub(repl, s)


def _is_unit_text(content: str) -> bool:
    """Whether a trailing `\\text{...}` content reads as a unit or a count noun (see policy (a))."""
    words = re.findall(r"[A-Za-z]+", content.lower())
    if not words or len(words) > 4:
        return False
    if "".join(words) in ("am", "pm") or words in (["i"], ["e"]):
        return False
    return not any(w in _CONDITION_WORDS for w in words)


def _head_is_numeric(head: str) -> bool:
    """Whether the math before a unit ends like a quantity: a digit, `)]}!`, `\\pi` or `\\infty`."""
    return bool(head) and (head[-1].isdigit() or head[-1] in "})]!" or head.endswith(("\\pi", "\\infty")))


def _strip_text_units(s: str) -> str:
    """Policy (a): drop trailing `\\text{unit}` groups after a quantity."""
    if "{" not in s:
        return s
    offset = max(0, len(s) - _TAIL_WINDOW)
    m = _TEXT_UNIT_RUN_RE.search(s, offset)
    if m is None or not all(_is_unit_text(c) for c in _UNIT_GROUP_RE.findall(m.group())):
        return s
    head = s[: m.start()].rstrip()
    return head if _head_is_numeric(head) else s


def _balance_braces(s: str) -> str:
    """Drop each `}` that closes nothing; close each `{` still open at the end (`\\frac{1}{2`)."""
    if "{" not in s and "}" not in s:
        return s
    depth, stray = 0, []
    for m in _BRACE_TOKEN_RE.finditer(s):
        if m.group() == "{":
            depth += 1
        elif m.group() == "}":
            if depth:
                depth -= 1
            else:
                stray.append(m.start())
    if stray:
        keep, pos = [], 0
        for at in stray:
            keep.append(s[pos:at])
            pos = at + 1
        keep.append(s[pos:])
        s = "".join(keep)
    return s + "}" * depth


def _unwrap_text(s: str) -> str:
    """`\\text{abc}` -> `abc` (and the other wrappers in `_UNWRAP_RE`), nested groups included."""
    hits = [(m.start(), m.end() - 1) for m in _UNWRAP_RE.finditer(s) if m.group() != "\\\\"]
    if not hits:
        return s
    close = matching_braces(s, {brace for _, brace in hits})
    drops = []
    for start, brace in hits:
        end = close.get(brace)
        if end is not None:
            drops.append((start, brace + 1))
            drops.append((end, end + 1))
    drops.sort()
    out, pos = [], 0
    for start, end in drops:
        out.append(s[pos:start])
        pos = end
    out.append(s[pos:])
    return "".join(out)


def _strip_plain_units(s: str) -> str:
    """Policies (b) and (c): a unit word after a quantity; a plain number followed by a few words."""
    offset = max(0, len(s) - _TAIL_WINDOW)
    m = _PLAIN_UNIT_RE.search(s, offset)
    if m is not None:
        head = s[: m.start()].rstrip()
        if _head_is_numeric(head):
            return head
    m = _NUMBER_WORDS_RE.fullmatch(s)
    if m is not None:
        words = [re.sub(r"[^a-z]", "", w.lower()) for w in m.group(2).split()]
        # "5 apples", "42 (pounds of sand)"; not "2 pi" (no word of 3+ letters) or "9 a.m."
        if (any(len(w) >= 3 for w in words) and not any(w in _MATH_WORDS for w in words)
                and "".join(words) not in ("am", "pm")):
            return m.group(1)
    return s


def _merge_thousands(s: str) -> str:
    def repl(m: re.Match) -> str:
        before = s[m.start() - 1] if m.start() > 0 else ""
        after = s[m.end()] if m.end() < len(s) else ""
        if before in "([" and before and after in ")]" and after:
            return m.group()  # `(1,000)` alone in brackets: an interval or a point, not a number
        return m.group().replace(",", "")

    return _THOUSANDS_RE.sub(repl, s)


def _lowercase_words(s: str) -> str:
    return _CASE_RE.sub(lambda m: m.group(1).lower() if m.group(1) else m.group(), s)


def _brace_arguments(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`: frac/binom/sqrt arguments get braces."""
    if "\\frac" not in s and "\\sqrt" not in s and "\\binom" not in s:
        return s
    close = matching_braces(s)
    n = len(s)
    edits: list[tuple[int, int, str]] = []  # (position, characters to delete there, text to insert)
    for m in _ARG_CMD_RE.finditer(s):
        name = m.group(1)
        if name is None:
            continue
        p = m.end()
        num_args = 2
        if name == "sqrt":
            num_args = 1
            if p < n and s[p] == "[":
                q = s.find("]", p)
                if q < 0:
                    continue
                p = q + 1
        for _ in range(num_args):
            if p < n and s[p] == " ":  # the space kept after a command before a letter (`\\frac a b`)
                edits.append((p, 1, ""))
                p += 1
            if p >= n:
                break
            c = s[p]
            if c == "{":
                q = close.get(p)
                if q is None:
                    break
                p = q + 1
            elif c.isascii() and c.isalnum():
                edits += [(p, 0, "{"), (p + 1, 0, "}")]
                p += 1
            elif c == "\\" and (cm := _ONE_COMMAND_RE.match(s, p)):
                edits += [(p, 0, "{"), (cm.end(), 0, "}")]
                p = cm.end()
                if p < n and s[p] == " ":  # `\\sqrt\\pi r` -> `\\sqrt{\\pi}r`: braces end the name now
                    edits.append((p, 1, ""))
            else:
                break
    if not edits:
        return s
    edits.sort(key=lambda edit: edit[0])
    out, pos = [], 0
    for at, delete, text in edits:
        if at < pos:
            continue  # a space already deleted by an overlapping command chain
        out.append(s[pos:at])
        out.append(text)
        pos = at + delete
    out.append(s[pos:])
    return "".join(out)


def _brace_scripts(s: str) -> str:
    return _SCRIPT_RE.sub(lambda m: f"{m.group(1)}{{{m.group(2)}}}" if m.group(1) else m.group(), s)


def _split_top_level(s: str) -> list[str]:
    """Split at commas outside any (), [], {} (so intervals and tuples stay whole)."""
    parts, depth, start = [], 0, 0
    for m in _TOP_LEVEL_TOKEN_RE.finditer(s):
        c = m.group()
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            parts.append(s[start : m.start()])
            start = m.end()
    parts.append(s[start:])
    return parts


def _is_constant(expr: str) -> bool:
    """No variables: no letters but `e`/`i` outside command names, no Greek-letter commands but `\\pi`."""
    expr = _ENV_NAME_RE.sub("", expr)
    for m in _COMMAND_RE.finditer(expr):
        if m.group(1) in _GREEK_SET:
            return False
    return not _VARIABLE_LETTER_RE.search(_COMMAND_RE.sub("", expr))


_GREEK_SET = frozenset(_GREEK)


def _strip_equation_sides(s: str) -> str:
    if "=" not in s and "\\in" not in s and "\\approx" not in s:
        return s
    m = _IN_RE.fullmatch(s)
    if m is not None:
        return m.group(1).strip()
    parts = _split_top_level(s)
    matches = [_EQ_RE.fullmatch(item) for item in parts]
    # names in a list carry meaning when they differ (`x=1,y=2` is not `x=2,y=1`): keep them then
    names = {item.split("=", 1)[0].strip() for item, m in zip(parts, matches) if m is not None}
    if len(parts) > 1 and len(names) > 1:
        return s
    items = [m.group(1).strip() if m is not None and _is_constant(m.group(1)) else item for item, m in zip(parts, matches)]
    return ",".join(items)


def _canonical_number(m: re.Match) -> str:
    frac = m.group(2).rstrip("0")
    return f"{m.group(1)}.{frac}" if frac else m.group(1)


def _strip_outer_braces(s: str) -> str:
    """`{5}` -> `5`, `{{5}}` -> `5`; `{1}+{2}` and `\\{1\\}` are left alone."""
    if not (s.startswith("{") and s.endswith("}")):
        return s
    close = matching_braces(s)
    i, j = 0, len(s) - 1
    while i < j and s[i] == "{" and close.get(i) == j:
        i, j = i + 1, j - 1
    return s[i : j + 1]


def _strip_punctuation(s: str) -> str:
    """Trailing `.,;:`, `\\\\` and spaces; leading `:`, `,` and spaces. Scans only what it strips."""
    end = len(s)
    while end > 0:
        if s[end - 1] in " .,;:":
            end -= 1
        elif end >= 2 and s[end - 2 : end] == "\\\\":
            end -= 2
        else:
            break
    start = 0
    while start < end and s[start] in " :,":
        start += 1
    return s[start:end]


def _normalize(s: str) -> str:
    # --- repairs, delimiters, spacing
    s = _CONTROL_RE.sub(lambda m: _CONTROL_FIX[m.group()], s)
    if "\u00b2" in s or "\u00b3" in s:
        s = _POWER_UNIT_RE.sub("", s)
    s = s.translate(_UNICODE)
    s = strip_math_delimiters(s)
    s = _LEFT_RIGHT_RE.sub(_keep_linebreak(""), s)
    s = _spacing(s)
    s = _SPACES_RE.sub(" ", s)  # from here on, whitespace is single spaces (keeps the regexes below cheap)
    s = _rename_commands(s).replace("{,}", ",")
    # --- units, words and text groups (order matters: degrees before units, units before unwrapping)
    s = _ORDINAL_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_DOLLAR_RE.sub(_keep_linebreak(""), s)
    s = _TEXT_CONJ_RE.sub(",", s)
    s = _balance_braces(_strip_punctuation(s))
    s = _strip_text_units(s)
    s = _unwrap_text(s)
    s = _strip_punctuation(_SPACES_RE.sub(" ", s))
    s = _PLAIN_CONJ_RE.sub(",", s)
    s = _strip_plain_units(s)
    s = _merge_thousands(s)
    # --- spelling of the remaining LaTeX (scripts before spaces go: `\log_2 8` is not `\log_{28}`)
    s = _brace_scripts(s)
    s = _WS_RE.sub(lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = _lowercase_words(s)
    s = s.replace("{bmatrix}", "{pmatrix}")
    s = _MATRIX_OPEN_RE.sub(lambda m: "\\begin{pmatrix}", s)
    s = _MATRIX_CLOSE_RE.sub(lambda m: "\\end{pmatrix}", s)
    s = _brace_arguments(s)
    s = _strip_outer_braces(_strip_punctuation(s))
    s = _strip_equation_sides(s)
    if _CHOICE_RE.fullmatch(s):
        s = s[1].upper()
    # --- numbers and final punctuation
    s = _LEADING_DOT_RE.sub("0.", s)
    s = _LEADING_ZERO_RE.sub("", s)
    s = _DECIMAL_RE.sub(_canonical_number, s)
    s = _brace_scripts(s)  # `x^.5` only became `x^0.5` just now
    s = _INNER_PLUS_RE.sub("", s)
    s = _COMMAS_RE.sub(",", s)
    s = _strip_punctuation(s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    s = _strip_outer_braces(_strip_punctuation(s))
    # Every comma left is a separator. One that would read as a thousands separator when normalised again
    # (`48, 384`) keeps a space after it, so the output is stable and never means a different number.
    return _LIST_COMMA_RE.sub(r"\1, ", s)


def _normalize_safe(text: str) -> str:
    try:
        return _normalize(text)
    except Exception:  # never raise inside a reward function; fall back to a whitespace-free copy
        return "".join(text.split())


_normalize_cached = lru_cache(maxsize=1 << 16)(_normalize_safe)


def normalize_answer(text: str) -> str:
    """The canonical string form of an answer (policies in the module docstring).

    Inputs longer than `_FULL_MAX_LEN` characters are not answers (the longest gold answer in our
    benchmarks has about 3,800): they only get `$` and whitespace removed, so a runaway box in a response
    costs milliseconds. Never raises: None gives "", other non-strings go through `str()`.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        try:
            text = str(text)
        except Exception:
            return ""
    if len(text) <= _CACHE_MAX_LEN:
        return _normalize_cached(text)
    if len(text) > _FULL_MAX_LEN:
        return "".join(text.replace("$", "").split())
    return _normalize_safe(text)
