"""The eval benchmark table: frozen records, one per task, and loading their problems.

Each record names where the problems come from twice: a file under a data folder (`--data-dir`,
`eval.data_dir` or `MATHCTL_DATA_DIR`; the layout of ../shared/data/benchmarks, `NAME/test.jsonl`)
and a hub dataset (id, config, split) for machines that can reach the hub. The fields differ
between the two copies of some sets, so problems and answers are read by an ordered list of
candidate fields: the first one present wins.

Bump a record's `version` whenever its prompt, data or answer reading changes; it is written into
every eval result so numbers from different versions are never compared by accident.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError, DataError

DEFAULT_PROMPT = "{problem}\nLet's think step by step and output the final answer within \\boxed{}."
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
    hub_id: str
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
    path: str | None = None  # a user's own JSONL file (task given as a path), read instead of local/hub


# Answer readers: "field:NAME" (the value as it is), "hash:NAME" (text after the last `####`),
# "boxed:NAME" (the last \boxed{} in the field), "gsm:NAME" (after `####` when present, else as it is).
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
]}

ALIASES: dict[str, str] = {alias: b.name for b in BENCHMARKS.values() for alias in b.aliases}
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
    from mathctl.grading import extract_boxed_all

    for spec in bench.answer:
        kind, name = _reader(spec)
        value = row.get(name)
        if value is None or value == "":
            continue
        if kind == "field":
            return value
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
        return " ".join(parts) if parts else None
    for name in bench.problem:
        if row.get(name):
            return str(row[name])
    return None


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
    else:
        rows = (hub_loader or _load_hub)(bench)
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
