"""`mathctl data pairs`: preference pairs from a model's own graded answers, for `mathctl dpo`.

For every problem (a JSONL file of problems with gold answers, or the built-in synthetic ones) the engine
samples `sampling.n` answers; the grader marks each against the gold (the same grader `mathctl eval`
uses); a problem with both correct and incorrect answers gives up to `pairs.max_per_problem` pairs of
(a correct answer, an incorrect one), each answer used as rarely as possible, chosen with a seed that
depends only on `pairs.seed` and the problem. A problem whose answers are all correct or all wrong gives
no pair (it is counted).

Run folder:
    samples.jsonl  one record per problem: the prompt, the gold, every sample with its grade, the pairs made
    pairs.jsonl    {prompt: [chat messages], chosen: text, rejected: text, ...}: `mathctl dpo`'s data.source
    summary.json   problems, with both correct and incorrect answers, all correct, all wrong, pairs written
Both files are appended a chunk of problems at a time; `--resume` skips the problems already in
samples.jsonl (and drops pairs of a problem whose samples record a kill cut off), so a resumed run writes
what an uninterrupted one would: each problem's samples depend only on the seed and the problem's index.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mathctl.core.config import EngineConfig, ModelSpec, OutputConfig, Strict
from mathctl.core.errors import ConfigError, DataError
from mathctl.core.rundir import RunDir
from mathctl.grading.graders import GraderName
from mathctl.rows import SyntheticData

SAMPLES = "samples.jsonl"
PAIRS = "pairs.jsonl"


# --- config -----------------------------------------------------------------------------------
class PairsData(Strict):
    """The problems to answer."""

    source: str = Field("synthetic", description="`synthetic`, or a JSONL file of problems: the problem in problem, "
                        "question, prompt or input; the gold in answer (text after #### if present), final_answer, "
                        "ground_truth, gold, or the last \\boxed{} of solution.")
    prompt_template: str = Field("{prompt}", description="User turn built from the problem; `{prompt}` is replaced.")
    system_prompt: str | None = Field(None, description="A system message put first.")
    limit: int | None = Field(None, ge=1, description="Only the first N problems.")
    synthetic: SyntheticData = Field(default_factory=SyntheticData)


class PairsSampling(Strict):
    """How answers are sampled (the engine's SamplingConfig, per problem)."""

    n: int = Field(8, ge=2, description="Answers sampled per problem.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (pairs need varied answers: > 0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling.")
    max_new_tokens: int = Field(1024, ge=1, description="Tokens per answer at most.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    seed: int = Field(0, description="Sampling seed; a problem's answers depend only on it and the problem's index.")


class PairsSpec(Strict):
    """Which pairs are written."""

    max_per_problem: int = Field(1, ge=1, description="Pairs per problem at most (k).")
    seed: int = Field(0, description="Seed of the choice of pairs among a problem's correct x incorrect answers.")
    drop_truncated: bool = Field(False, description="Leave out answers cut by max_new_tokens (on both sides).")
    grader: GraderName = Field("mathctl", description="Who decides correctness: mathctl's grader or math-verify.")
    grading_timeout_s: float = Field(1.0, gt=0, description="Time limit of one symbolic equivalence check.")
    chunk_problems: int = Field(64, ge=1, description="Problems per engine call, appended together (the resume unit).")


class PairsConfig(Strict):
    """`mathctl data pairs` recipe."""

    step: Literal["pairs"] = "pairs"
    model: ModelSpec
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: PairsData = Field(default_factory=PairsData)
    sampling: PairsSampling = Field(default_factory=PairsSampling)
    pairs: PairsSpec = Field(default_factory=PairsSpec)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check(self) -> PairsConfig:
        if "{prompt}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}")
        if self.engine.data_parallel_size > 1:
            raise ValueError("data pairs runs one engine; set engine.data_parallel_size=1 (tensor_parallel_size "
                             "spreads one vLLM engine over several GPUs)")
        return self

    def seeds(self) -> dict[str, int]:
        return {"sampling": self.sampling.seed, "pairs": self.pairs.seed, "synthetic": self.data.synthetic.seed}


# --- problems ---------------------------------------------------------------------------------
def load_problems(data: PairsData) -> list[dict[str, Any]]:
    """[{index, problem, answer}] with a gold answer each; fails before anything is written."""
    if data.source == "synthetic":
        from mathctl.rows import load_rows

        rows = load_rows("synthetic", synthetic=data.synthetic)
        problems = [{"index": i, "problem": r["problem"], "answer": r["answer"]} for i, r in enumerate(rows)]
    else:
        from mathctl.benchmarks import file_benchmark
        from mathctl.benchmarks import load_problems as read_file

        path = Path(data.source).expanduser()
        if path.suffix != ".jsonl" or not path.is_file():
            raise DataError(f"problem file {data.source} is not an existing .jsonl file",
                            hint="set data.source to a JSONL file of problems with gold answers, or `synthetic`")
        problems = [{"index": p.index, "problem": p.problem, "answer": p.gold}
                    for p in read_file(file_benchmark(str(path)), None) if p.gold is not None]
    return problems[: data.limit] if data.limit else problems


def prompt_messages(problem: str, data: PairsData) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    return messages + [{"role": "user", "content": data.prompt_template.replace("{prompt}", problem)}]


def choose_pairs(correct: list[int], wrong: list[int], k: int, rng: random.Random) -> list[tuple[int, int]]:
    """Up to k (correct, wrong) sample indices, no pair twice, spreading the picks over distinct answers:
    both lists are shuffled and walked together, so the i-th pair takes correct[i % C] and wrong[i % W]
    (then the remaining combinations in shuffled order once every answer has been used)."""
    if not correct or not wrong:
        return []
    correct, wrong = correct[:], wrong[:]
    rng.shuffle(correct)
    rng.shuffle(wrong)
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i in range(max(len(correct), len(wrong))):
        pair = (correct[i % len(correct)], wrong[i % len(wrong)])
        if len(chosen) < k and pair not in seen:
            chosen.append(pair)
            seen.add(pair)
    rest = [(c, w) for c in correct for w in wrong if (c, w) not in seen]
    rng.shuffle(rest)
    return chosen + rest[: k - len(chosen)]


def problem_seed(index: int) -> int:
    return zlib.crc32(f"pairs:{index}".encode())


# --- resume -------------------------------------------------------------------------------------
def read_done(run_dir: RunDir) -> list[dict[str, Any]]:
    """The finished problems' records; the pairs file is cut back to the pairs of those problems (a kill
    between writing a chunk's pairs and its samples leaves pairs that a resume would write again)."""
    from mathctl.core.io import atomic_write_text

    samples_path, pairs_path = run_dir.path / SAMPLES, run_dir.path / PAIRS
    done = []
    if samples_path.is_file():
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill, and nothing after it
        atomic_write_text(samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    finished = {r["index"] for r in done}
    if pairs_path.is_file():
        kept = []
        for line in pairs_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row.get("problem_index") in finished:
                kept.append(line + "\n")
        atomic_write_text(pairs_path, "".join(kept))
    return done


# --- run ----------------------------------------------------------------------------------------
def run(cfg: PairsConfig, run_dir: RunDir) -> dict[str, Any]:
    """Sample, grade and pair every problem of `cfg` into `run_dir`; returns the summary (summary.json)."""
    from mathctl.core.config import SamplingConfig
    from mathctl.core.console import log, progress
    from mathctl.engines import make_engine
    from mathctl.grading import shutdown_workers
    from mathctl.grading.graders import grade_with, require_grader

    require_grader(cfg.pairs.grader)
    problems = load_problems(cfg.data)
    if not problems:
        raise DataError(f"no problem of {cfg.data.source} has a gold answer", hint="add an `answer` to every row")
    done = read_done(run_dir)
    finished = {r["index"] for r in done}
    todo = [p for p in problems if p["index"] not in finished]
    if finished:
        log(f"resuming: {len(finished)} problems already in {SAMPLES}")
    s = cfg.sampling
    sampling = SamplingConfig(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_new_tokens=s.max_new_tokens, stop=s.stop, seed=s.seed)
    started = time.perf_counter()
    engine = make_engine(cfg.model, cfg.engine) if todo else None
    try:
        if engine is not None and not engine.chat_template:
            raise ConfigError(f"{cfg.model.path} has no chat template; pairs are written with the prompt in chat form",
                              hint="set model.chat_template (e.g. chatml)")
        with progress("pairs", len(todo)) as advance:
            for start in range(0, len(todo), cfg.pairs.chunk_problems):
                chunk = todo[start:start + cfg.pairs.chunk_problems]
                prompts = [prompt_messages(p["problem"], cfg.data) for p in chunk]
                outputs = engine.generate(prompts, sampling, prompt_seeds=[problem_seed(p["index"]) for p in chunk])
                texts = [sample.text for samples in outputs for sample in samples]
                golds = [p["answer"] for p in chunk for _ in range(s.n)]
                grades = iter(grade_with(cfg.pairs.grader, texts, golds, timeout_s=cfg.pairs.grading_timeout_s))
                records, pair_rows = [], []
                for problem, messages, samples in zip(chunk, prompts, outputs):
                    graded = [{"text": x.text, "correct": g.correct, "extracted": g.extracted,
                               "finish_reason": x.finish_reason} for x, g in zip(samples, grades)]
                    usable = [k for k, x in enumerate(graded)
                              if not (cfg.pairs.drop_truncated and x["finish_reason"] == "length")]
                    correct = [k for k in usable if graded[k]["correct"]]
                    wrong = [k for k in usable if not graded[k]["correct"]]
                    rng = random.Random(cfg.pairs.seed * 1_000_003 + problem["index"])
                    chosen = choose_pairs(correct, wrong, cfg.pairs.max_per_problem, rng)
                    for c, w in chosen:
                        pair_rows.append({"prompt": messages, "chosen": graded[c]["text"], "rejected": graded[w]["text"],
                                          "problem_index": problem["index"], "answer": str(problem["answer"]),
                                          "chosen_answer": graded[c]["extracted"], "rejected_answer": graded[w]["extracted"]})
                    records.append({"index": problem["index"], "problem": problem["problem"],
                                    "answer": str(problem["answer"]), "prompt": messages, "samples": graded,
                                    "num_correct": sum(x["correct"] for x in graded), "pairs": [list(p) for p in chosen]})
                # pairs first: a kill before the samples line is written makes the resume redo (and re-pair) the chunk
                with (run_dir.path / PAIRS).open("a", encoding="utf-8") as handle:
                    handle.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in pair_rows))
                with (run_dir.path / SAMPLES).open("a", encoding="utf-8") as handle:
                    handle.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
                done += records
                advance(len(chunk), pairs=str(sum(len(r["pairs"]) for r in done)))
    finally:
        if engine is not None:
            engine.close()
        shutdown_workers()
    summary = summarize(done, s.n)
    summary.update(status="completed", run_dir=str(run_dir.path), path=str(run_dir.path / PAIRS),
                   model=cfg.model.path, seconds=round(time.perf_counter() - started, 1))
    log(f"{summary['problems']} problems: {summary['with_both']} with both correct and incorrect answers, "
        f"{summary['all_correct']} all correct, {summary['all_wrong']} all wrong; {summary['pairs']} pairs written "
        f"to {summary['path']} (sample accuracy {summary['sample_accuracy']:.3f})")
    run_dir.finish("completed", summary)
    return summary


def summarize(records: list[dict[str, Any]], n: int) -> dict[str, Any]:
    problems = len(records)
    correct = [r["num_correct"] for r in records]
    return {"problems": problems, "samples_per_problem": n,
            "with_both": sum(0 < c < len(r["samples"]) for c, r in zip(correct, records)),
            "all_correct": sum(c == len(r["samples"]) for c, r in zip(correct, records)),
            "all_wrong": sum(c == 0 for c in correct),
            "problems_with_pairs": sum(bool(r["pairs"]) for r in records),
            "pairs": sum(len(r["pairs"]) for r in records),
            "sample_accuracy": sum(correct) / max(1, sum(len(r["samples"]) for r in records))}
