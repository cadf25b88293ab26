"""`mathctl data decontaminate`: normalisation, the three match kinds, boilerplate and number rules,
planted copies of real math500/gsm8k test problems among clean synthetic rows, every input format,
and the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathctl.core.errors import ConfigError, DataError
from mathctl.decontaminate import (
    TestIndex,
    decontaminate_file,
    decontaminate_rows,
    normalize_text,
    read_table,
    tokens,
)
from mathctl.synthetic import SyntheticSpec, generate

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"
needs_data = pytest.mark.skipif(not (BENCHMARKS / "math500" / "test.jsonl").is_file()
                                or not (BENCHMARKS / "gsm8k" / "test.jsonl").is_file(),
                                reason="needs ../shared/data/benchmarks (math500, gsm8k)")

# --- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ("Find $x$ if $x+1=3$.", "find  $x$ if $x + 1 = 3$"),  # case, spacing, final full stop
    (r"Compute $\dfrac{1}{2}$.", r"Compute $\frac{1}{2}$."),
    (r"$\left( x \right)^{2}$", "$(x)^2$"),  # sizing, one-character braces
    (r"$a \leq b$, so $1,000$", r"$a\le b$, so $1{,}000$"),
    ("A \x0crac{1}{2}", r"A \frac{1}{2}"),  # backslash lost to a JSON escape
    ("$x^{2}+2 a x$", "$x^2 + 2ax$"),  # letters in math are separate variables
])
def test_normalize_equal(a, b):
    assert normalize_text(a) == normalize_text(b)


@pytest.mark.parametrize("a, b", [
    (r"Compute $\cos 315^\circ$.", r"Compute $\cos(-315^\circ)$."),  # the sign is kept
    (r"$\frac{12}{5}$", r"$\frac{1}{25}$"),
    ("$ab$", "$a b c$"),
])
def test_normalize_different(a, b):
    assert normalize_text(a) != normalize_text(b)


def test_tokens():
    assert tokens(r"Let $f(x)=x^{4}+a x^{3}$ be \textbf{nice}.") == ["let", "f", "x", "=", "x", "4", "+", "a", "x",
                                                                      "3", "be", "nice"]
    assert tokens("He paid $5 for a toy and $10 for a book") == ["he", "paid", "5", "for", "a", "toy", "and", "10",
                                                                 "for", "a", "book"]  # dollars, not math
    assert tokens("See [asy]draw((0,0)--(1,1));[/asy] below") == ["see", "below"]  # figure code left out


# --- matching, on hand-written test problems -------------------------------------------------

LONG = ("A bag holds 7 red marbles and 5 blue marbles. Two marbles are drawn at random without replacement. "
        "What is the probability that both marbles drawn are red? Express the answer as a fraction.")
SHORT = r"Compute $\dbinom{8}{4}$."


def _index(**kwargs) -> TestIndex:
    return TestIndex.from_problems({"toy": [(0, LONG), (1, SHORT)]}, **kwargs)


def test_kinds_and_overlap():
    index = _index()
    [m] = index.match(LONG)
    assert (m.task, m.test_index, m.kind, m.overlap) == ("toy", 0, "exact", 1.0)
    [m] = index.match("  " + LONG.upper().replace(" ", "  "))
    assert (m.kind, m.overlap) == ("normalized", 1.0)
    [m] = index.match("Warm-up for the quiz. " + LONG + " Show every step of your work.")
    assert (m.kind, m.overlap) == ("ngram", 1.0)
    [m] = index.match(LONG.replace("Express the answer as a fraction.", "Give a decimal."))
    assert m.kind == "ngram" and 0.5 <= m.overlap < 1.0
    assert index.match("The weather was 7 degrees warmer and 5 people came. Nothing else.") == []


def test_number_rule():
    variant = LONG.replace("7 red", "8 red")
    assert _index().match(variant) == []  # another problem: the test problem's 7 is missing
    [m] = _index().match(variant, same_numbers=False)
    assert m.kind == "ngram" and m.overlap < 1.0
    spelled = "Five of the boxes hold pens and two of the boxes hold both pens and pencils today."
    index = TestIndex.from_problems({"toy": [(0, spelled)]})
    assert index.match(spelled.replace("Five", "Six")) == []  # spelled-out numbers count too
    assert index.match(spelled.replace("Five", "5"))[0].kind == "ngram"


def test_short_test_problem_matches_only_whole():
    index = _index()
    assert index.match(r"compute $\binom{8}{4}$")[0].kind == "normalized"
    assert index.match(r"Compute $\dbinom{8}{4}$ and then add 3 to it.") == []


def test_boilerplate_ngrams_do_not_match():
    tail = "Express your answer as a common fraction in lowest terms please."
    tests = {"toy": [(i, f"Problem number {i} asks about the {w} of a shape with side {i + 3}. {tail}")
                     for i, w in enumerate(["area", "perimeter", "height", "width", "volume", "angle", "radius"])]}
    row = f"How many ways can 4 people sit around a round table? {tail}"
    loose = {"min_overlap": 0.0, "same_numbers": False}
    assert TestIndex.from_problems(tests).match(row, **loose) == []  # the tail is in 7 test problems
    assert TestIndex.from_problems(tests, max_test_df=10).match(row, **loose)  # not boilerplate now
    # the same problems as a reference only (checking just one task) still mark the tail as boilerplate
    alone = TestIndex.from_problems({"toy": tests["toy"][:1]}, reference={"other": [t for _, t in tests["toy"][1:]]})
    assert alone.match(row, **loose) == []
    assert TestIndex.from_problems({"toy": tests["toy"][:1]}).match(row, **loose)


def test_report_keep_and_settings():
    rows = ["nothing to see here at all, just words", LONG, "also clean"]
    report = decontaminate_rows(rows, index=_index())
    assert report.removed_rows == [1] and report.kept_rows == [0, 2]
    assert report.keep(["a", "b", "c"]) == ["a", "c"]
    assert report.counts()["toy"] == {"exact": 1, "normalized": 0, "ngram": 0}
    assert report.to_dict()["settings"]["ngram"] == 8
    with pytest.raises(ConfigError):
        decontaminate_rows(rows, index=_index(), min_overlap=1.5)
    with pytest.raises(ConfigError, match="unknown eval task"):
        decontaminate_rows(rows, ["math5000"], BENCHMARKS)


# --- planted contamination from the real test sets -------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Only math500 and gsm8k, so that the index (and its boilerplate reference) builds in a blink."""
    root = tmp_path_factory.mktemp("benchmarks")
    for name in ("math500", "gsm8k"):
        (root / name).symlink_to(BENCHMARKS / name, target_is_directory=True)
    return root


def _test_problems(name: str) -> list[str]:
    field = "problem" if name == "math500" else "question"
    return [json.loads(line)[field] for line in (BENCHMARKS / name / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def planted() -> tuple[list[dict], dict[int, tuple[str, int, str]], list[int]]:
    """Rows (problem, solution, answer) with 3 contaminated ones; row -> (task, test index, kind); clean rows."""
    math500, gsm8k = _test_problems("math500"), _test_problems("gsm8k")
    exact = math500[25]
    variant = "  " + math500[10].upper().replace(" ", "   ")  # case and spacing
    variant = variant.replace("30", "$30$")  # and dollar signs
    embedded = ("Here is a practice problem from last week. " + gsm8k[12]
                + " Think it through before you answer, and box the final number.")
    rows = generate(SyntheticSpec(num_problems=50, seed=3))
    rows = [{k: r[k] for k in ("problem", "solution", "answer")} for r in rows]
    expect = {}
    for position, (text, task, index, kind) in zip((7, 20, 41), [(exact, "math500", 25, "exact"),
                                                               (variant, "math500", 10, "normalized"),
                                                               (embedded, "gsm8k", 12, "ngram")]):
        rows.insert(position, {"problem": text, "solution": "copied", "answer": "0"})
        expect[position] = (task, index, kind)
    clean = [i for i in range(len(rows)) if i not in expect]
    return rows, expect, clean


@needs_data
def test_planted_rows_are_caught(planted, data_dir):
    rows, expect, clean = planted
    report = decontaminate_rows([r["problem"] for r in rows], ["math500", "gsm8k"], data_dir)
    assert report.removed_rows == sorted(expect)
    for flagged in report.flagged:
        best = flagged.matches[0]
        assert (best.task, best.test_index, best.kind) == expect[flagged.row]
    assert report.flagged[-1].matches[0].overlap == 1.0  # the whole gsm8k problem is inside the row
    assert report.kept_rows == clean
    assert report.settings["reference_tasks"] == []  # the data dir holds only the two tasks asked for


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@needs_data
@pytest.mark.parametrize("fmt", ["jsonl", "disk", "parquet"])
def test_filtered_copy_keeps_exactly_the_clean_rows(fmt, planted, data_dir, tmp_path):
    import datasets

    rows, expect, clean = planted
    if fmt == "jsonl":
        source = _write_jsonl(tmp_path / "train.jsonl", rows)
    elif fmt == "disk":
        source = tmp_path / "train"
        datasets.Dataset.from_list(rows).save_to_disk(str(source))
    else:
        source = tmp_path / "train.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(source))
    summary = decontaminate_file(source, "math500,gsm8k", data_dir=data_dir)
    out = Path(summary["output"])
    assert out.name == ("train-decontaminated" if fmt == "disk" else f"train-decontaminated.{fmt}")
    if fmt == "jsonl":
        kept = [json.loads(line) for line in out.read_text().splitlines()]
    elif fmt == "disk":
        kept = datasets.load_from_disk(str(out)).to_list()
    else:
        kept = datasets.Dataset.from_parquet(str(out)).to_list()
    assert kept == [rows[i] for i in clean]
    report = json.loads(Path(summary["report"]).read_text())
    assert Path(summary["report"]).parent == (out if fmt == "disk" else out.parent)
    assert [r["row"] for r in report["removed"]] == sorted(expect)
    assert report["per_task"]["math500"] == {"exact": 1, "normalized": 1, "ngram": 0}
    assert summary["rows_removed"] == 3 and summary["rows_kept"] == len(clean)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind
    with pytest.raises(ConfigError, match="already exists"):
        decontaminate_file(source, "math500", data_dir=data_dir)


def test_read_table_fields(tmp_path):
    chat = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    table = read_table(_write_jsonl(tmp_path / "chat.jsonl", chat))
    assert (table.field, table.problems) == ("messages", ["What is 2+2?"])
    table = read_table(_write_jsonl(tmp_path / "q.jsonl", [{"id": 1, "question": "Why?", "problem": 3}]))
    assert table.field == "question"  # problem holds no text, question does
    with pytest.raises(DataError, match=r"no field 'text' \(fields: q, a\)"):
        read_table(_write_jsonl(tmp_path / "qa.jsonl", [{"q": "x", "a": 1}]), "text")
    with pytest.raises(DataError, match="no problem field"):
        read_table(tmp_path / "qa.jsonl")
    with pytest.raises(DataError, match="row 2"):
        read_table(_write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a"}, {"problem": None}]))
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "missing.jsonl")


# --- the command line ------------------------------------------------------------------------


@needs_data
def test_cli_json(cli, planted, data_dir, tmp_path):
    rows, expect, clean = planted
    source = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    result = cli("data", "decontaminate", str(source), "--against", "math500,gsm8k", "--data-dir", str(data_dir),
                 "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_removed"] == 3 and summary["per_task"] == {"math500": 2, "gsm8k": 1}
    assert len(out.read_text().splitlines()) == len(clean)
    assert (tmp_path / "clean.decontamination.json").is_file()
    assert "removed 3 of 53 rows" in result.stderr


def _one_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_cli_user_errors(cli, tmp_path):
    source = _write_jsonl(tmp_path / "train.jsonl", [{"problem": "What is 1+1?"}])
    error = _one_error(cli("data", "decontaminate", str(source), "--against", "math500,nosuchtask"))
    assert "unknown eval task 'nosuchtask'" in error
    error = _one_error(cli("data", "decontaminate", str(source), "--against", "math500", "--field", "question"))
    assert "no field 'question'" in error and str(source) in error
    error = _one_error(cli("data", "decontaminate", str(tmp_path / "nope.jsonl"), "--against", "math500"))
    assert "does not exist" in error
