"""`mathctl data decontaminate`: drop training rows whose problem overlaps an eval test problem.

    mathctl data decontaminate train.jsonl --against math500,aime2024 --data-dir ../shared/data/benchmarks

A training problem is checked against every test problem of the tasks given, three ways, strongest first:

    exact       the two texts are equal (surrounding whitespace ignored)
    normalized  equal after `normalize_text` (typesetting differences removed, below)
    ngram       they share word n-grams (`tokens`): at least one informative n-gram of the test
                problem occurs in the training problem, at least `min_overlap` of the test problem's
                informative n-grams do, and every number of the test problem occurs there too

`overlap` is the fraction of the test problem's informative n-grams found in the training problem
(1.0 for exact and normalized matches), so a training row that embeds a whole test problem in other
text scores 1.0 whatever its own length.

Normalisation, so that copies that differ only in typesetting compare equal:
    - Unicode NFKC (full-width digits, non-breaking spaces), the minus sign U+2212 as `-`, lower case;
    - a form feed or backspace before a letter becomes `\\f` / `\\b` again (a LaTeX backslash lost to a
      JSON escape, as in a few omni-math and aime25 rows: form feed + `rac{1}{2}` is `\\frac{1}{2}`);
    - inside math (`$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]`, align/equation environments) every letter
      is its own token, so `2ax` and `2 a x` agree (omni-math and olympiadbench space their
      products, MATH does not); math that holds two words of 3+ letters (`$5 for a toy and $`) is prose;
    - delimiters (`$`, `\\(`, `\\[`...), sizing (`\\left`, `\\right`, `\\big`, `\\displaystyle`), spacing
      (`\\,` `\\;` `\\:` `\\!` `\\quad` `~`), text wrappers (`\\text`, `\\textbf`, `\\mathrm`, `\\mbox`; their
      argument stays) and markdown emphasis (`**`, `__`) go;
    - one spelling each: `\\dfrac`/`\\tfrac` -> `\\frac`, `\\dbinom`/`\\tbinom` -> `\\binom`, `\\leq` -> `\\le`
      (also geq, neq), `\\lvert`/`\\rvert`/`\\vert` -> `|`, `\\ldots`/`\\cdots` -> `\\dots`, `°` -> `^\\circ`,
      `1{,}000` and `1,000` -> `1000`;
    - for the normalized kind only: braces around one character go (`x^{2}` is `x^2`), whitespace
      stays only between two letters or digits, and a final full stop is dropped.
`tokens` are then the runs of letters, the runs of digits and the operators `+ - = < >` (they tell
`f(x)f(y)-f(xy)=x+y` from `f(x)f(y)+f(x+y)=xy`); other symbols and brackets are dropped.
Asymptote figures (`[asy]...[/asy]`) are left out of the tokens: MATH problems share long stretches
of boilerplate figure code (axes, grids), which made unrelated problems look 60-80% alike.

Defaults, measured on MATH train (7500) and GSM8K train (7473) against all 14 tasks:
    n = 8 (`DEFAULT_NGRAM`). Math problems are short (median MATH test problem: about 30 tokens,
        one in ten under 13), so GPT-3's 13-grams miss copies that differ every few words; open-r1's
        decontamination uses 8-grams. 10- and 13-grams lose real copies from omni-math; 6-grams let
        short test problems match fragments of unrelated ones (`frac x - 1 x - 2`).
    max_test_df = 5 (`DEFAULT_MAX_TEST_DF`). An n-gram found in more than 5 distinct test problems
        (`solve the equation giving the exact solutions which lie in 0 2 pi`, `where m and n are
        relatively prime positive integers`, `arrange the letters of the word`) is boilerplate: it
        neither opens a match nor counts in the overlap. It is counted over distinct normalized texts
        (math500 lies inside math) of all tasks whose test file is in the data folder, not only the
        tasks asked for, so a task gets the same matches alone as with `all`.
    min_overlap = 0.5 (`DEFAULT_MIN_OVERLAP`). Any shared informative n-gram flags 825 MATH train
        rows (3143 without the number rule), mostly problems sharing a sentence. Real copies from
        other sets score 0.55-1.0 (typesetting leaves some n-grams unequal); MATH's own templated
        problems (same setup, another question: "put 5 balls in 2 boxes if the balls are
        distinguishable but the boxes are not") score 0.5-0.9 and are flagged as near duplicates;
        below 0.5 shared setup sentences dominate, with a few reworded copies.
    same numbers (on; `--number-variants` turns it off). A test problem with other numbers is
        another problem ("... divided by 8?" and "... divided by 9?"; "Roslyn has ten boxes. Six of
        ..." and "... Five of ..."), so an n-gram match needs every number of the test problem, with
        its count, in the training problem (spelled-out numbers up to twenty and tens count as
        numbers). This halves the flags on MATH train (394 -> 201 rows) and leaves GSM8K train with
        none, matching its known disjointness from the GSM8K test set.
A test problem shorter than n tokens ("Compute $\\dbinom{8}{4}$.") has no n-gram; it is matched only
as a whole (exact or normalized), since such short problems recur inside different longer ones.

Limits: this finds copies and light edits (typesetting, a reworded clause, an added instruction), not
paraphrases, translations, or copies whose numbers were changed (unless `same_numbers` is off). It
compares problem texts only, not solutions. Chinese text has no spaces, so a run of Chinese
characters is one token; such sets match mainly by the exact and normalized kinds.

Input: a `datasets.Dataset.save_to_disk` folder, a `.jsonl` or a `.parquet` file, with the problem in
`--field` or the first of problem, question, prompt (text or chat) or messages (the first user turn).
Output: a filtered copy in the same format, written under a temporary name and renamed, plus a report
`decontamination.json` (settings, counts per task and kind, each removed row with its matches) inside
the output folder or, for a file, beside it as `<output stem>.decontamination.json`. Rows are
numbered from 0 in the report (the index `Dataset.select` takes).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathctl.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mathctl.benchmarks import Benchmark

DEFAULT_NGRAM = 8
DEFAULT_MIN_OVERLAP = 0.5
DEFAULT_MAX_TEST_DF = 5
PROBLEM_FIELDS = ("problem", "question", "prompt", "messages")  # auto-detected, first present wins
KINDS = ("exact", "normalized", "ngram")  # strongest first
REPORT_NAME = "decontamination.json"
SNIPPET_CHARS = 200

# --- normalisation -----------------------------------------------------------------------------

_LOST_ESCAPE = re.compile(r"([\x08\x0c])(?=[a-zA-Z])")
_MATH = re.compile(r"(?<!\\)\$\$.+?(?<!\\)\$\$|(?<!\\)\$.+?(?<!\\)\$|\\\(.+?\\\)|\\\[.+?\\\]"
                   r"|\\begin\{(align|equation|eqnarray|gather|multline)\*?\}.*?\\end\{\1\*?\}", re.DOTALL)
_MATH_WORD = re.compile(r"\\(?:text\w*|mathrm|mbox|operatorname|begin|end)\s*\{[^{}]*\}|\\[a-zA-Z]+")
_MATH_PART = re.compile(_MATH_WORD.pattern + r"|[a-zA-Z]")
_PROSE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}\b.*?(?<![\\a-zA-Z])[a-zA-Z]{3,}\b", re.DOTALL)  # two words
_DROP = re.compile(
    r"\\(?:left|right|bigg|big|displaystyle|textstyle|q?quad)(?![a-zA-Z])"  # sizing, wide spaces (lower case)
    r"|\\(?:textbf|textit|text|mathrm|mbox)(?![a-zA-Z])"  # text wrappers (the argument stays)
    r"|\\[,;:! ]|\\[()\[\]]|\$|\*\*|__"  # spacing, math delimiters, markdown emphasis
)
_VARIANTS = re.compile(r"\\[dt](frac|binom)(?![a-z])|\\(le|ge|ne)q(?![a-z])|\\[lr]?vert(?![a-z])|\\[lc]?dots(?![a-z])"
                       r"|°|(?<=\d)\{,\}(?=\d)|(?<=\d),(?=\d{3}(?!\d))")  # on lower-case text


def _variant(match: re.Match) -> str:
    """One spelling for each: \\dfrac \\tfrac -> \\frac, \\leq -> \\le, \\lvert -> |, \\ldots -> \\dots,
    ° -> ^\\circ, 1{,}000 and 1,000 -> 1000."""
    text = match.group(0)
    if match.group(1) or match.group(2):
        return "\\" + (match.group(1) or match.group(2))
    if text.endswith("vert"):
        return "|"
    if text.endswith("dots"):
        return "\\dots"
    return "^\\circ" if text == "°" else ""


_SPACE = re.compile(r"[\s~]+")
_LOOSE_SPACE = re.compile(r" (?=\W)|(?<=\W) ")  # a space next to a symbol carries nothing
_ONE_CHAR_GROUP = re.compile(r"(?<!\\)\{ ?([^{}\\ ]) ?\}")  # x^{2} is x^2 (not for tokens: {1}{2} would become 12)
_TOKEN = re.compile(r"[^\W\d_]+|\d+|[-+=<>]")  # words, numbers and the operators that change a formula
_ASY = re.compile(r"\[asy\].*?(?:\[/asy\]|$)", re.DOTALL)  # Asymptote figure code (on lower-case text)
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
                                                      "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100"}


def _numbers(words: Iterable[str]) -> Counter[str]:
    """The numbers among tokens, with their counts; `five` counts as 5 (word problems spell numbers out)."""
    return Counter(word if word.isdigit() else _NUMBER_WORDS[word] for word in words
                   if word.isdigit() or word in _NUMBER_WORDS)


def _split_math(match: re.Match) -> str:
    """Letters in math are separate variables: `2ax` and `2 a x` both become 2 a x."""
    segment = match.group(0)
    if _PROSE.search(_MATH_WORD.sub(" ", segment)):  # `$5 for a toy and $10 for a book`: prose, not math
        return segment
    return _MATH_PART.sub(lambda part: f" {part.group(0)} ", segment)


def _clean(text: str) -> str:
    """Every normalisation step that keeps token boundaries."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")  # NFKC keeps the minus sign U+2212
    text = _LOST_ESCAPE.sub(lambda m: "\\b" if m.group(1) == "\x08" else "\\f", text)
    text = _VARIANTS.sub(_variant, _DROP.sub(" ", _MATH.sub(_split_math, text).lower()))
    return _SPACE.sub(" ", text).strip()


def _forms(text: str) -> tuple[str, list[str]]:
    """(normalized text, word tokens) of a problem."""
    clean = _clean(text)
    normalized = _LOOSE_SPACE.sub("", _ONE_CHAR_GROUP.sub(r"\1", clean)).rstrip(". ")
    words = _TOKEN.findall(_ASY.sub(" ", clean))
    return normalized, words


def normalize_text(text: str) -> str:
    """The matching form of a problem for the `normalized` kind (see the module docstring)."""
    return _forms(text)[0]


def tokens(text: str) -> list[str]:
    """The tokens n-grams are made of: runs of letters, runs of digits and + - = < > (figures left out)."""
    return _forms(text)[1]


def ngrams(words: Sequence[str], n: int) -> set[str]:
    """Distinct word n-grams, each joined with single spaces (none when there are fewer than n words)."""
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


# --- the test-set index ------------------------------------------------------------------------


@dataclass(frozen=True)
class TestItem:
    task: str
    index: int  # position in the task's test file (Problem.index), the key eval results use
    problem: str
    id: Any = None  # the row's own id field (math: `index`, math500: `unique_id`), when it has one

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class Match:
    task: str
    test_index: int
    test_id: Any
    kind: str  # exact | normalized | ngram
    overlap: float  # fraction of the test problem's informative n-grams found in the training row
    test_problem: str  # truncated


class TestIndex:
    """Test problems of several tasks, indexed by raw text, normalized text and n-gram.

    Built once (`build`, or `from_problems` for problems already in memory); `match` then checks one
    training problem with a dictionary look-up per n-gram, so its cost grows with the training
    row's length, not with the number of test problems.

    `reference` problems (other tasks' test sets) only help to decide which n-grams are
    boilerplate, so that a task gets the same matches whether it is checked alone or with others.
    """

    __test__ = False

    def __init__(self, items: list[TestItem], *, n: int = DEFAULT_NGRAM, max_test_df: int = DEFAULT_MAX_TEST_DF,
                 reference: dict[str, Sequence[str]] | None = None):
        if n < 1:
            raise ConfigError(f"n-gram size must be >= 1 (got {n})", hint="e.g. --ngram 8")
        if max_test_df < 1:
            raise ConfigError(f"max_test_df must be >= 1 (got {max_test_df})", hint="e.g. 5")
        self.n, self.max_test_df, self.items = n, max_test_df, items
        reference = reference or {}
        self.reference_tasks = list(reference)
        self.exact: dict[str, list[int]] = {}
        self.normalized: dict[str, list[int]] = {}
        self._numbers: dict[int, Counter[str]] = {}  # number tokens of an item, filled on demand
        grams_of: list[set[str]] = []
        df: Counter[str] = Counter()  # over distinct normalized texts: math500 is inside math
        seen: set[str] = set()
        for item_id, item in enumerate(items):
            norm, words = _forms(item.problem)
            self.exact.setdefault(item.problem.strip(), []).append(item_id)
            self.normalized.setdefault(norm, []).append(item_id)
            grams_of.append(ngrams(words, n))
            if norm not in seen:
                seen.add(norm)
                df.update(grams_of[-1])
        for text in (text for texts in reference.values() for text in texts):
            norm, words = _forms(text)
            if norm not in seen:
                seen.add(norm)
                df.update(ngrams(words, n))
        # Only informative n-grams are indexed: boilerplate neither opens a match nor counts in overlap.
        self.common = {gram for gram, count in df.items() if count > max_test_df}
        self.grams: dict[str, list[int]] = {}
        self.num_ngrams: list[int] = []  # informative n-grams per item; 0: matched only as a whole
        for item_id, grams in enumerate(grams_of):
            grams -= self.common
            self.num_ngrams.append(len(grams))
            for gram in grams:
                self.grams.setdefault(gram, []).append(item_id)

    @classmethod
    def from_problems(cls, problems: dict[str, Sequence[tuple[int, str]]], *, n: int = DEFAULT_NGRAM,
                      max_test_df: int = DEFAULT_MAX_TEST_DF,
                      reference: dict[str, Sequence[str]] | None = None) -> TestIndex:
        """Index `{task: [(test_index, problem), ...]}`; `reference` is `{task: [problem, ...]}`."""
        items = [TestItem(task, index, text, index) for task, rows in problems.items() for index, text in rows]
        return cls(items, n=n, max_test_df=max_test_df, reference=reference)

    @classmethod
    def build(cls, against: str | Iterable[str], data_dir: str | os.PathLike | None = None, *,
              n: int = DEFAULT_NGRAM, max_test_df: int = DEFAULT_MAX_TEST_DF) -> TestIndex:
        """Index the test problems of the tasks named in `against` (names or aliases; `all` = every task).

        With a data folder, the other tasks whose test file is there serve as the boilerplate
        reference (about 2 s for all of them); without one (hub), only the tasks asked for do.

        Raises:
            ConfigError: an unknown task (the message lists the known ones).
            DataError: a task's test file is missing under `data_dir` (or the hub is unreachable).
        """
        from mathctl.benchmarks import BENCHMARKS, load_problems, resolve_data_dir

        benches = resolve_tasks(against)
        folder = resolve_data_dir(str(data_dir) if data_dir is not None else None)
        items = [TestItem(b.name, p.index, p.problem, p.id) for b in benches for p in load_problems(b, folder)]
        asked = {b.name for b in benches}
        reference: dict[str, list[str]] = {}
        for bench in BENCHMARKS.values():
            if folder is None or bench.name in asked or not (folder / bench.local / "test.jsonl").is_file():
                continue
            try:
                reference[bench.name] = [p.problem for p in load_problems(bench, folder)]
            except DataError:  # an unreadable file that was not asked for only leaves the reference smaller
                continue
        return cls(items, n=n, max_test_df=max_test_df, reference=reference)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(item.task for item in self.items))

    def numbers(self, item_id: int) -> Counter[str]:
        """The number tokens of a test problem, with their counts (figures left out)."""
        if item_id not in self._numbers:
            self._numbers[item_id] = _numbers(_forms(self.items[item_id].problem)[1])
        return self._numbers[item_id]

    def match(self, problem: str, *, min_overlap: float = DEFAULT_MIN_OVERLAP,
              same_numbers: bool = True) -> list[Match]:
        """Every test problem that `problem` is contaminated by, strongest kind first.

        `same_numbers`: an n-gram match also needs every number of the test problem (with its
        count) in the training problem; False flags templated variants with other numbers too.
        """
        found: dict[int, tuple[str, float]] = {}
        for item_id in self.exact.get(problem.strip(), ()):
            found[item_id] = ("exact", 1.0)
        norm, words = _forms(problem)
        for item_id in self.normalized.get(norm, ()):
            found.setdefault(item_id, ("normalized", 1.0))
        hits: Counter[int] = Counter()
        for gram in ngrams(words, self.n):
            hits.update(self.grams.get(gram, ()))
        row_numbers: Counter[str] | None = None
        for item_id, count in hits.items():
            overlap = count / self.num_ngrams[item_id]
            if item_id in found or overlap < min_overlap:
                continue
            if same_numbers:
                if row_numbers is None:
                    row_numbers = _numbers(words)
                if self.numbers(item_id) - row_numbers:  # a number of the test problem is missing
                    continue
            found[item_id] = ("ngram", overlap)
        matches = [Match(self.items[i].task, self.items[i].index, self.items[i].id, kind, round(overlap, 4),
                         _snippet(self.items[i].problem)) for i, (kind, overlap) in found.items()]
        return sorted(matches, key=lambda m: (KINDS.index(m.kind), -m.overlap, m.task, m.test_index))


def resolve_tasks(against: str | Iterable[str]) -> list[Benchmark]:
    """Benchmark records for task names or aliases (`all`: every task in BENCHMARKS), without repeats.
    A string is split at commas."""
    from mathctl.benchmarks import BENCHMARKS, get_benchmark

    if isinstance(against, str):
        against = against.split(",")
    names = [name.strip() for name in against if name.strip()]
    if not names:
        raise ConfigError("no task to check against", hint=f"e.g. --against math500,aime2024 or all; available: "
                          f"{', '.join(BENCHMARKS)}")
    benches = {}
    for name in names:
        for bench in (BENCHMARKS.values() if name.lower() == "all" else [get_benchmark(name)]):
            benches.setdefault(bench.name, bench)
    return list(benches.values())


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 3] + "..."


# --- checking rows -----------------------------------------------------------------------------


@dataclass
class FlaggedRow:
    row: int  # 0-based position in the input (what Dataset.select takes)
    problem: str  # truncated
    matches: list[Match]

    @property
    def kind(self) -> str:
        return self.matches[0].kind  # matches are sorted strongest first


@dataclass
class Report:
    """What `decontaminate_rows` found: settings, the rows flagged and their matches."""

    settings: dict[str, Any]
    num_rows: int
    flagged: list[FlaggedRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def removed_rows(self) -> list[int]:
        return [f.row for f in self.flagged]

    @property
    def kept_rows(self) -> list[int]:
        removed = set(self.removed_rows)
        return [i for i in range(self.num_rows) if i not in removed]

    def keep(self, rows: Sequence[Any]) -> list[Any]:
        """The items of `rows` (parallel to the checked problems) that were not flagged."""
        if len(rows) != self.num_rows:
            raise ValueError(f"keep() got {len(rows)} rows for a report on {self.num_rows}")
        return [rows[i] for i in self.kept_rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows flagged per task and kind (a row matching two tasks counts once in each; its kind
        for a task is its strongest match there)."""
        per_task: dict[str, dict[str, int]] = {task: dict.fromkeys(KINDS, 0) for task in self.settings["against"]}
        for flagged in self.flagged:
            best: dict[str, str] = {}
            for m in flagged.matches:
                best.setdefault(m.task, m.kind)
            for task, kind in best.items():
                per_task.setdefault(task, dict.fromkeys(KINDS, 0))[kind] += 1
        return per_task

    def by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys(KINDS, 0)
        for flagged in self.flagged:
            totals[flagged.kind] += 1
        return totals

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "rows_in": self.num_rows, "rows_removed": len(self.flagged),
                "rows_kept": self.num_rows - len(self.flagged), "seconds": round(self.seconds, 3),
                "by_kind": self.by_kind(), "per_task": self.counts(),
                "removed": [{"row": f.row, "kind": f.kind, "problem": f.problem,
                             "matches": [asdict(m) for m in f.matches]} for f in self.flagged]}


def decontaminate_rows(problems: Sequence[str], against: str | Iterable[str] | None = None,
                       data_dir: str | os.PathLike | None = None, *, n: int = DEFAULT_NGRAM,
                       min_overlap: float = DEFAULT_MIN_OVERLAP, max_test_df: int = DEFAULT_MAX_TEST_DF,
                       same_numbers: bool = True, index: TestIndex | None = None) -> Report:
    """Check training problems against the test problems of `against`.

    Args:
        problems: the training problem texts, one per row.
        against: task names or aliases, or one comma-separated string (`all`: every task);
            ignored when `index` is given.
        data_dir: folder with NAME/test.jsonl (default: MATHCTL_DATA_DIR, else the hub).
        n, min_overlap, max_test_df, same_numbers: see the module docstring (n and max_test_df
            are the index's when `index` is given).
        index: a `TestIndex` built earlier, to check several inputs against the same tasks.

    Returns:
        A `Report`: `removed_rows`, `kept_rows`, `keep(rows)`, per-row matches and counts.

    Raises:
        ConfigError: an unknown task or a setting out of range.
        DataError: a test file is missing.
    """
    if not 0.0 <= min_overlap <= 1.0:
        raise ConfigError(f"min overlap must be between 0 and 1 (got {min_overlap})", hint="e.g. --min-overlap 0.5")
    began = time.perf_counter()
    if index is None:
        if against is None:
            raise ConfigError("no task to check against", hint="pass against=[...] or index=")
        index = TestIndex.build(against, data_dir, n=n, max_test_df=max_test_df)
    report = Report(settings={"against": index.tasks, "ngram": index.n, "min_overlap": min_overlap,
                              "max_test_df": index.max_test_df, "same_numbers": same_numbers,
                              "test_problems": len(index.items), "reference_tasks": index.reference_tasks},
                    num_rows=len(problems))
    for row, text in enumerate(problems):
        matches = index.match(text, min_overlap=min_overlap, same_numbers=same_numbers)
        if matches:
            report.flagged.append(FlaggedRow(row, _snippet(text), matches))
    report.seconds = time.perf_counter() - began
    return report


# --- reading and writing datasets --------------------------------------------------------------


@dataclass
class Table:
    """Rows read from disk in one of the three formats, with what is needed to write them back."""

    path: Path
    fmt: str  # disk | jsonl | parquet
    data: Any  # Dataset | list[dict] | pyarrow.Table
    problems: list[str]
    field: str


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise DataError(f"{path} is a DatasetDict folder (several splits)",
                            hint="pass one split's folder, e.g. " + str(path / "train"))
        if not (path / "state.json").is_file():
            raise DataError(f"folder {path} is not a datasets save_to_disk folder (no state.json)",
                            hint="give a save_to_disk folder, a .jsonl or a .parquet file")
        return "disk"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    raise DataError(f"cannot read {path}: expected a save_to_disk folder, a .jsonl or a .parquet file",
                    hint="convert the file to JSONL (one object per line) or Parquet")


def read_table(path: str | os.PathLike, field_name: str | None = None) -> Table:
    """Read an input and pull the problem text out of every row.

    Raises:
        DataError: the input is missing or unreadable, or a row has no usable problem field.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"input {path} does not exist", hint="give a save_to_disk folder, a .jsonl or a .parquet file")
    fmt = detect_format(path)
    try:
        if fmt == "jsonl":
            from mathctl.core.io import read_jsonl

            data = read_jsonl(path)
            column_names = list(data[0]) if data else []
            first = data[0] if data else None
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            data = pq.read_table(path)
            column_names = data.column_names
            first = data.slice(0, 1).to_pylist()[0] if data.num_rows else None
        else:
            import datasets

            data = datasets.load_from_disk(str(path))
            column_names = data.column_names
            first = data[0] if len(data) else None
    except DataError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        raise DataError(f"cannot read {path}: {text.splitlines()[0] if text else type(exc).__name__}",
                        hint="check the file's format") from None
    if first is None:
        raise DataError(f"{path} has no rows", hint="check the input")
    name = _problem_field(path, first, field_name)
    if fmt == "jsonl":
        values = [row.get(name) for row in data]
    elif fmt == "parquet":
        values = data.column(name).to_pylist()
    else:
        values = data[name]
    problems = []
    for number, value in enumerate(values, 1):
        text = _problem_text(value)
        if text is None:
            raise DataError(f"{path} row {number}: field '{name}' holds no problem text "
                            f"({type(value).__name__ if value is not None else 'missing or null'})",
                            hint=f"fix or drop the row; fields of the first row: {', '.join(column_names)}")
        problems.append(text)
    return Table(path, fmt, data, problems, name)


def _problem_field(path: Path, first: dict[str, Any], given: str | None) -> str:
    fields = ", ".join(first) or "none"
    if given is not None:
        if given not in first:
            raise DataError(f"{path}: the first row has no field '{given}' (fields: {fields})",
                            hint="pass --field with one of those")
        return given
    for name in PROBLEM_FIELDS:
        if name in first and _problem_text(first[name]) is not None:
            return name
    raise DataError(f"{path}: the first row has no problem field ({' / '.join(PROBLEM_FIELDS)}; fields: {fields})",
                    hint="pass --field NAME with the field that holds the problem")


def _problem_text(value: Any) -> str | None:
    """A string as it is; a chat (list of {role, content}) gives its first user message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in value:
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
    return None


def default_output(path: str | os.PathLike) -> Path:
    """INPUT with `-decontaminated` before its suffix (a folder gets it at the end)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path.with_name(path.name.rstrip("/") + "-decontaminated")
    return path.with_name(f"{path.stem}-decontaminated{path.suffix}")


def report_path(out: Path, fmt: str) -> Path:
    return out / REPORT_NAME if fmt == "disk" else out.with_name(f"{out.stem}.{REPORT_NAME}")


def write_filtered(table: Table, report: Report, out: Path) -> Path:
    """Write the kept rows to `out` in the input's format and the report; returns the report path."""
    from mathctl.core.io import atomic_write_json, write_jsonl

    kept = report.kept_rows
    summary = {**report.to_dict(), "input": str(table.path), "output": str(out), "field": table.field}
    if table.fmt == "jsonl":
        write_jsonl(out, [table.data[i] for i in kept])
    elif table.fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(table.data.take(pa.array(kept, type=pa.int64())), tmp)
        os.replace(tmp, out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        table.data.select(kept).save_to_disk(str(tmp))
        atomic_write_json(tmp / REPORT_NAME, summary)
        if out.exists():
            out.rmdir()  # an empty folder (checked by the caller)
        tmp.rename(out)
        return out / REPORT_NAME
    path = report_path(out, table.fmt)
    atomic_write_json(path, summary)
    return path


def decontaminate_file(input_path: str | os.PathLike, against: str | Iterable[str], *,
                       out: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                       n: int = DEFAULT_NGRAM, min_overlap: float = DEFAULT_MIN_OVERLAP,
                       max_test_df: int = DEFAULT_MAX_TEST_DF, same_numbers: bool = True,
                       field_name: str | None = None) -> dict[str, Any]:
    """Read INPUT, drop the rows that overlap a test problem, write the rest and the report.

    Returns the summary (also what `--json` prints): counts, paths, settings, seconds.

    Raises:
        ConfigError: an unknown task, a bad setting, or an output that exists or is the input.
        DataError: missing or unreadable input, no problem field, missing test files.
    """
    began = time.perf_counter()
    if not 0.0 <= min_overlap <= 1.0:
        raise ConfigError(f"min overlap must be between 0 and 1 (got {min_overlap})", hint="e.g. --min-overlap 0.5")
    source = Path(input_path).expanduser()
    table = read_table(source, field_name)  # input problems first: they need no test data
    target = Path(out).expanduser() if out is not None else default_output(source)
    if target.resolve() == source.resolve():
        raise ConfigError(f"output {target} is the input", hint="choose another --out")
    if table.fmt != "disk" and target.suffix != source.suffix:
        raise ConfigError(f"output {target} must be a {source.suffix} file like the input",
                          hint=f"e.g. --out {default_output(source)}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"output {target} already exists", hint="choose a new --out, or delete it first")
    index = TestIndex.build(against, data_dir, n=n, max_test_df=max_test_df)
    report = decontaminate_rows(table.problems, min_overlap=min_overlap, same_numbers=same_numbers, index=index)
    report.seconds = time.perf_counter() - began
    written = write_filtered(table, report, target)
    return {"status": "completed", "input": str(source), "output": str(target), "report": str(written),
            "field": table.field, "rows_in": report.num_rows, "rows_removed": len(report.flagged),
            "rows_kept": report.num_rows - len(report.flagged), "by_kind": report.by_kind(),
            "per_task": {task: sum(kinds.values()) for task, kinds in report.counts().items()},
            "settings": report.settings, "seconds": round(time.perf_counter() - began, 3)}
