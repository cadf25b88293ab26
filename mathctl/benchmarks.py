"""The eval benchmark table: frozen records, one per task, and loading their problems.

Each record names where the problems come from twice: a file under a data folder (`--data-dir`,
`eval.data_dir` or `MATHCTL_DATA_DIR`; the layout of ../shared/data/benchmarks, `NAME/test.jsonl`)
and a hub dataset (id, config, split) for machines that can reach the hub; a few sets exist only as
files (Qwen2.5-Math's evaluation data) and have no hub copy. The fields differ between the two copies of
some sets, so problems and answers are read by an ordered list of candidate fields: the first one
present wins.

Multiple-choice questions: the problem shows the options labelled (A), (B), ... (`options`: a list
field, or a string that labels them itself; the gaokao and middle-school sets have them in the question
text), and the gold is a `mathctl.grading.Choice` (option letters, read by a `choice:` reader), which
the grader matches against the option letters of the model's final answer. Sets that mix choice and
fill-in questions read the choice gold first and fall back to the value (`choice:choice_answer`, then
`field:answer`).

Bump a record's `version` whenever its prompt, data or answer reading changes; it is written into
every eval result so numbers from different versions are never compared by accident.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError, DataError

DEFAULT_PROMPT = "{problem}\nLet's think step by step and output the final answer within \\boxed{}."
# Every question of the task is multiple-choice: ask for the option letter.
CHOICE_PROMPT = ("{problem}\nLet's think step by step and output the letter of the correct option within "
                 "\\boxed{}.")
# Choice and fill-in questions mixed (gaokao, middle school): a value, or the letters of the options.
MIXED_PROMPT = ("{problem}\nLet's think step by step and output the final answer within \\boxed{}; for a "
                "multiple-choice question, the letter of each correct option.")
DATA_DIR_ENV = "MATHCTL_DATA_DIR"


@dataclass(frozen=True)
class DefaultSampling:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 4096


GREEDY = DefaultSampling()
# The DeepScaleR / Instella-Math evaluation of small-sample competition sets: avg over 16 samples.
SAMPLED = DefaultSampling(n=16, temperature=0.6, top_p=0.95, max_new_tokens=32768)


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    local: str  # folder under the data dir holding test.jsonl
    hub_id: str | None  # None: no hub copy, the local file only
    hub_split: str
    hub_config: str | None = None
    problem: tuple[str, ...] = ("problem", "question")  # first present field (several joined with a space: see join)
    join: tuple[str, ...] = ()  # fields concatenated into the problem (svamp: Body + Question)
    answer: tuple[str, ...] = ("answer",)  # candidate answer readers, see read_answer
    id_field: str | None = None
    prompt: str = DEFAULT_PROMPT
    sampling: DefaultSampling = GREEDY
    aliases: tuple[str, ...] = ()
    version: int = 1
    extra_fields: tuple[str, ...] = field(default=())  # copied into results (subject, level, ...)
    options: str | None = None  # multiple-choice options appended to the problem, see render_options
    hub_keep: tuple[str, tuple[str, ...]] | None = None  # (field, values): the hub rows to keep (a subset)
    path: str | None = None  # a user's own JSONL file (task given as a path), read instead of local/hub


# The MMLU subjects of mmlu_stem (Qwen2.5-Math's selection): the rows of the full MMLU test set to keep.
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
)

# Answer readers: "field:NAME" (the value as it is), "hash:NAME" (text after the last `####`),
# "boxed:NAME" (the last \boxed{} in the field), "gsm:NAME" (after `####` when present, else as it is),
# "choice:NAME" (option letters `B`/`ACD`, or a 0-based option index, as a Choice gold; any other value
# falls through to the next reader: a fill-in question's answer).
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("gsm8k", "GSM8K test, 1319 grade-school word problems", "gsm8k", "openai/gsm8k", "test", "main",
              problem=("question",), answer=("hash:answer",), id_field="idx"),
    Benchmark("math", "MATH test, 5000 competition problems", "math", "DigitalLearningGmbH/MATH-lighteval", "test",
              problem=("question", "problem"), answer=("field:answer", "boxed:solution"), id_field="index",
              extra_fields=("level", "type")),
    Benchmark("math500", "MATH-500, the PRM800K test subset of MATH", "math500", "HuggingFaceH4/MATH-500", "test",
              answer=("field:answer",), id_field="unique_id", extra_fields=("subject", "level")),
    Benchmark("aime2024", "AIME 2024 I and II, 30 problems", "aime24", "HuggingFaceH4/aime_2024", "train",
              answer=("field:answer",), id_field="id", sampling=SAMPLED, aliases=("aime24",)),
    Benchmark("aime2025", "AIME 2025 I and II, 30 problems", "aime25", "yentinglin/aime_2025", "train",
              answer=("field:answer",), id_field="id", sampling=SAMPLED, aliases=("aime25",)),
    Benchmark("amc23", "AMC 2023, 40 problems", "amc23", "zwhe99/amc23", "test",
              answer=("field:answer",), id_field="id", sampling=SAMPLED, aliases=("amc2023",)),
    Benchmark("collegemath", "College Math test, 2818 problems", "collegemath", "qq8933/College_Math_Test", "train",
              problem=("question",), answer=("field:answer",), extra_fields=("data_topic",), aliases=("college_math",)),
    Benchmark("gaokao2023en", "Gaokao 2023 math, English, 385 problems", "gaokao2023en",
              "MARIO-Math-Reasoning/Gaokao2023-Math-En", "train", problem=("question",), answer=("field:answer",)),
    Benchmark("olympiadbench", "OlympiadBench, English open-ended math (OE_TO_maths_en_COMP), 675 problems",
              "olympiadbench", "Hothan/OlympiadBench", "train", "OE_TO_maths_en_COMP", problem=("question",),
              answer=("field:final_answer",), id_field="id", aliases=("olympiad_bench",)),
    Benchmark("omni-math", "Omni-MATH, 4428 olympiad-level problems", "omni-math", "KbsdJames/Omni-MATH", "test",
              problem=("question", "problem"), answer=("field:answer",), id_field="index", aliases=("omni_math", "omnimath")),
    Benchmark("minerva_math", "Minerva math (OCW courses), 272 problems", "minerva_math", "math-ai/minervamath", "test",
              problem=("problem", "question"), answer=("field:answer", "boxed:solution"), id_field="idx",
              aliases=("minerva",)),
    Benchmark("svamp", "SVAMP, 1000 varied arithmetic word problems", "svamp", "ChilleD/SVAMP", "test",
              join=("Body", "Question"), answer=("field:Answer",), id_field="ID"),
    Benchmark("asdiv", "ASDiv, 2215 diverse arithmetic word problems", "asdiv", "EleutherAI/asdiv", "validation",
              join=("body", "question"), answer=("field:answer",)),
    Benchmark("mawps", "MAWPS, 2065 arithmetic word problems", "mawps", "MU-NLPC/Calc-mawps", "test",
              problem=("input", "question"), answer=("field:target", "field:result")),
    Benchmark("carp_en", "CARP (English), 976 computation-heavy middle-school algebra problems", "carp_en",
              None, "test", problem=("content",), answer=("field:answer",)),
    Benchmark("cn_middle_school", "Chinese middle-school exam math (in Chinese), 101 problems, 41 multiple-choice",
              "cn_middle_school", None, "test", problem=("question",),
              answer=("choice:choice_answer", "field:answer"), id_field="idx", prompt=MIXED_PROMPT),
    # gaokao2024_I/II keep choice and fill-in answers in one field: letters are a choice question's answer
    # (exactly the rows of `type` single/multi; a fill-in answer is never capital letters A-E only).
    Benchmark("gaokao2024_I", "Gaokao 2024 paper I math (in Chinese), 14 problems: 8 single-choice, "
              "3 multi-select, 3 fill-in", "gaokao2024_I", None, "test", problem=("question",),
              answer=("choice:answer", "field:answer"), extra_fields=("type",), prompt=MIXED_PROMPT),
    Benchmark("gaokao2024_II", "Gaokao 2024 paper II math (in Chinese), 14 problems: 8 single-choice, "
              "3 multi-select, 3 fill-in", "gaokao2024_II", None, "test", problem=("question",),
              answer=("choice:answer", "field:answer"), extra_fields=("type",), prompt=MIXED_PROMPT),
    Benchmark("gaokao2024_mix", "Gaokao 2024 math, several papers (in Chinese), 91 problems, 55 multiple-choice",
              "gaokao2024_mix", None, "test", problem=("question",),
              answer=("choice:choice_answer", "field:answer"), id_field="idx", prompt=MIXED_PROMPT),
    Benchmark("mmlu_stem", "MMLU, its 18 STEM subjects, 3018 four-option questions", "mmlu_stem",
              "hails/mmlu_no_train", "test", "all", problem=("question",), answer=("choice:answer",),
              options="choices", prompt=CHOICE_PROMPT, extra_fields=("type", "subject"),
              hub_keep=("subject", MMLU_STEM_SUBJECTS)),
    Benchmark("sat_math", "SAT math, 32 four-option questions", "sat_math", None, "test", problem=("question",),
              answer=("choice:Answer",), options="options", id_field="id", prompt=CHOICE_PROMPT),
]}

ALIASES: dict[str, str] = {alias: b.name for b in BENCHMARKS.values() for alias in b.aliases}
# Names are matched without case (`gaokao2024_i` is gaokao2024_I).
ALIASES.update({b.name.lower(): b.name for b in BENCHMARKS.values() if b.name.lower() != b.name})
# Task names of lighteval and lm-evaluation-harness for the same sets (lm-eval's `minerva_math` is MATH with
# Minerva's prompt, not the Minerva OCW set that `minerva_math` names here, so it is not an alias).
ALIASES.update({
    "math_500": "math500", "minerva_math500": "math500", "hendrycks_math500": "math500",
    "hendrycks_math": "math",
    "aime_2024": "aime2024", "aime_2025": "aime2025",
    "gsm8k_cot": "gsm8k", "gsm8k_cot_zeroshot": "gsm8k", "gsm8k_cot_llama": "gsm8k",
    "gsm8k_cot_self_consistency": "gsm8k",
    "olympiadbench_math_en": "olympiadbench", "gaokao2023": "gaokao2023en",
})


FILE_SUFFIXES = (".jsonl", ".json")


def file_benchmark(path: str) -> Benchmark:
    """A user's JSONL file as a task: problem in problem/question/prompt/input, gold answer in
    answer (text after `####` if present), final_answer, ground_truth, or the last \\boxed{} of solution."""
    return Benchmark(
        name=path, description=f"problems from {path}", local="", hub_id="", hub_split="", path=path,
        problem=("problem", "question", "prompt", "input"),
        answer=("gsm:answer", "field:final_answer", "field:ground_truth", "field:gold", "boxed:solution"),
        id_field="id",
    )


def get_benchmark(name: str) -> Benchmark:
    """A task by name or alias, or a `.jsonl` file of the user's own problems."""
    if name.strip().endswith(FILE_SUFFIXES):
        if not Path(name).expanduser().is_file():
            raise ConfigError(f"eval task file {name} does not exist", hint="give an existing JSONL file, or a task name")
        return file_benchmark(name.strip())
    key = name.strip().lower()
    if key.count("|") >= 1:  # lighteval's task spec, suite|task|fewshot|truncate: the task part
        key = key.split("|")[1] if key.split("|")[0] in ("lighteval", "extended", "custom", "community") else key
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        import difflib

        close = difflib.get_close_matches(key, list(BENCHMARKS) + list(ALIASES), n=1)
        hint = f"did you mean {ALIASES.get(close[0], close[0])}? " if close else ""
        raise ConfigError(f"unknown eval task '{name}'",
                          hint=f"{hint}available: {', '.join(BENCHMARKS)}; or a path to your own .jsonl file")
    return BENCHMARKS[key]


def resolve_data_dir(given: str | None) -> Path | None:
    value = given or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


@dataclass
class Problem:
    index: int  # position in the benchmark file: the key results and resumes use
    id: Any
    problem: str
    gold: Any
    extra: dict[str, Any]


def _reader(spec: str) -> tuple[str, str]:
    kind, _, name = spec.partition(":")
    return kind, name


def read_answer(bench: Benchmark, row: dict[str, Any]) -> Any:
    from mathctl.grading import Choice, extract_boxed_all

    for spec in bench.answer:
        kind, name = _reader(spec)
        value = row.get(name)
        if value is None or value == "":
            continue
        if kind == "field":
            return value
        if kind == "choice":
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    return Choice.from_index(value)
                except ValueError:
                    raise DataError(f"{bench.name}: option index {value} in field '{name}' is out of range",
                                    hint="an option index is 0 (A) to 4 (E)") from None
            if isinstance(value, str) and _LETTERS_RE.fullmatch(value.strip()):
                return Choice(value)
            continue  # not a label: a fill-in question's answer, for the next reader
        if kind == "hash" or (kind == "gsm" and "####" in str(value)):
            return str(value).split("####")[-1].strip()
        if kind == "gsm":
            return value
        if kind == "boxed":
            boxed = extract_boxed_all(str(value))
            if boxed:
                return boxed[-1]
    return None


def read_problem(bench: Benchmark, row: dict[str, Any]) -> str | None:
    if bench.join:
        parts = [str(row[f]).strip() for f in bench.join if row.get(f)]
        text = " ".join(parts) if parts else None
    else:
        text = next((str(row[name]) for name in bench.problem if row.get(name)), None)
    if text is not None and bench.options and row.get(bench.options):
        text = text.rstrip() + "\n" + render_options(row[bench.options])
    return text


_LETTERS_RE = re.compile(r"[A-E]+")


def render_options(options: list[Any] | str) -> str:
    """Multiple-choice options, one per line, labelled `(A)`, `(B)`, ...: a list in option order, or a string
    that labels them itself (`A) 12 B) 15 C) 18`, `A. 12 B. 15 ...`, SAT math). A string whose labels cannot
    all be found in order (A first, then B, ...) is shown as it is."""
    if isinstance(options, (list, tuple)):
        return "\n".join(f"({letter}) {str(option).strip()}" for letter, option in zip("ABCDEFGHIJ", options))
    text = str(options).strip()
    starts = []  # (label start, text start) of each option
    for letter in "ABCDEFGHIJ":
        if not starts:  # the first label opens the string; each later one follows a space
            m = re.match(rf"{letter}[).]\s*", text)
        else:
            m = re.compile(rf"(?<=\s){letter}[).]\s+").search(text, starts[-1][1])
        if m is None:
            break
        starts.append((m.start(), m.end()))
    if len(starts) < 2:
        return text
    ends = [start for start, _ in starts[1:]] + [len(text)]
    bodies = [text[body:end].strip() for (_, body), end in zip(starts, ends)]
    return "\n".join(f"({letter}) {body}" for letter, body in zip("ABCDEFGHIJ", bodies))


def load_problems(bench: Benchmark, data_dir: Path | None, *,
                  hub_loader: Callable[[Benchmark], list[dict[str, Any]]] | None = None) -> list[Problem]:
    """All problems of `bench`: its own file, `data_dir/LOCAL/test.jsonl`, or else the hub."""
    if bench.path is not None:
        from mathctl.core.io import iter_jsonl

        rows = [row for _, row in iter_jsonl(Path(bench.path).expanduser())]
        source = bench.path
    elif data_dir is not None:
        path = data_dir / bench.local / "test.jsonl"
        if not path.is_file():
            raise DataError(f"{bench.name}: {path} does not exist",
                            hint=f"point --data-dir (or {DATA_DIR_ENV}) at a folder holding {bench.local}/test.jsonl")
        from mathctl.core.io import iter_jsonl

        rows = [row for _, row in iter_jsonl(path)]
        source = str(path)
    elif not bench.hub_id:
        raise DataError(f"{bench.name} has no hub copy; it is read from {bench.local}/test.jsonl in a data folder",
                        hint=f"pass --data-dir (or set {DATA_DIR_ENV}) to a folder with {bench.local}/test.jsonl "
                             "(../shared/data/benchmarks has one)")
    else:
        rows = (hub_loader or _load_hub)(bench)
        if bench.hub_keep is not None:
            keep_field, keep_values = bench.hub_keep
            rows = [row for row in rows if row.get(keep_field) in keep_values]
        source = f"{bench.hub_id}:{bench.hub_split}"
    problems = []
    for index, row in enumerate(rows):
        text = read_problem(bench, row)
        gold = read_answer(bench, row)
        if text is None:
            raise DataError(f"{bench.name}: row {index + 1} of {source} has no problem field "
                            f"({' or '.join(bench.join or bench.problem)})",
                            hint="check that the file is this benchmark's test set")
        problems.append(Problem(index=index, id=row.get(bench.id_field, index) if bench.id_field else index,
                                problem=text, gold=gold, extra={k: row[k] for k in bench.extra_fields if k in row}))
    if not problems:
        raise DataError(f"no problems in {source}", hint="give a file with one JSON object per line (a problem and "
                        "its answer)" if bench.path else f"check that {source} is {bench.name}'s test set")
    if all(p.gold is None for p in problems):
        fields = ", ".join(spec.partition(":")[2] for spec in bench.answer)
        raise DataError(f"{bench.name}: no row of {source} has a gold answer (looked for {fields})",
                        hint="add an `answer` field to every row")
    return problems


def _load_hub(bench: Benchmark) -> list[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(bench.hub_id, bench.hub_config, split=bench.hub_split)
    except Exception as exc:  # offline, gated, renamed: all the user can fix by giving local files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{bench.name}: cannot load {bench.hub_id} from the hub ({first})",
                        hint=f"pass --data-dir (or set {DATA_DIR_ENV}) to a folder with {bench.local}/test.jsonl") from None
    return [dict(row) for row in ds]


def render_prompt(template: str, problem: str) -> str:
    """`{problem}` is replaced; every other brace (LaTeX such as \\boxed{}) is left alone."""
    if "{problem}" not in template:
        raise ConfigError(f"prompt template has no {{problem}} placeholder: {template[:60]!r}",
                          hint="write the template with {problem} where the problem goes")
    return template.replace("{problem}", problem)
