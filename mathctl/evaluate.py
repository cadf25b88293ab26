"""`mathctl eval`: generate answers to benchmark problems, grade them, and score the model.

Flow per task: load the problems (local file or hub), keep this shard's share, skip the problems
already in `results.jsonl` (resume), then in chunks of `eval.chunk_problems`: one engine call for
the chunk, one grading call for its samples, and one appended `results.jsonl` line per problem.
`summary.json` is computed from `results.jsonl` alone, so resuming, merging shards and re-scoring
all go through the same function.

Metrics per task (n samples per problem, c of them correct):
- `score`: the mean of c/n over problems; reported as `accuracy` when n == 1 and as `avg@n` else.
- `pass@k`: the unbiased estimator 1 - C(n-c, k) / C(n, k), averaged over problems (k <= n).
- `maj@k`: majority vote over the first k samples' normalised answers; samples without an answer
  do not vote; a tie goes to the answer reached first; no answer at all counts as wrong.
- `bon@k` (best of k), when samples carry a reward-model `score`: the highest-scored of the first
  k samples decides (ties: the earliest).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from mathctl.core.config import (
    EngineConfig,
    LaunchConfig,
    ModelSpec,
    OutputConfig,
    SamplingConfig,
    Strict,
    TrackingConfig,
)
from mathctl.core.errors import ConfigError, GateFailed
from mathctl.core.rundir import RunDir
from mathctl.grading.graders import GraderName
from mathctl.processbench import TASK as PROCESSBENCH
from mathctl.processbench import ProcessBenchSettings

RESULTS = "results.jsonl"


# --- config -----------------------------------------------------------------------------------


class TaskSettings(Strict):
    """Per-task settings; each one left null keeps the task's default."""

    prompt: str | None = Field(None, description="Prompt template with a {problem} placeholder.")
    n: int | None = Field(None, ge=1, description="Samples per problem.")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling.")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens per sample at most.")


class EvalSection(TaskSettings):
    """What to evaluate and how. Sampling keys set here apply to every task (over task defaults);
    `per_task.NAME.KEY` overrides them for one task."""

    tasks: list[str] = Field(default_factory=list, description="Benchmarks, e.g. [math500, aime2024]; "
                             "`mathctl eval TASK[,TASK]` sets it. [processbench] alone: judge a process reward "
                             "model (eval.prm) on ProcessBench instead (eval.processbench).")
    data_dir: str | None = Field(None, description="Folder with local benchmark copies (NAME/test.jsonl); "
                                 "default: $MATHCTL_DATA_DIR, else the hub.")
    limit: int | None = Field(None, ge=1, description="Only the first N problems of each task (processbench: N "
                                 "solutions spread evenly through each split).")
    shard: str | None = Field(None, description="`i/N`: this machine's share of the problems (every N-th from i); "
                              "merge the shards with `mathctl eval merge`.")
    replica: str | None = Field(None, description="Set by data-parallel inference for its workers (engine."
                                "data_parallel_size): `k/N` of this run's problems after the shard; not set by hand.")
    system_prompt: str | None = Field(None, description="A system message before the problem (chat format only).")
    prompt_format: Literal["auto", "chat", "raw"] = Field(
        "auto", description="chat: the prompt goes through the chat template; raw: it is sent as plain text; "
        "auto: chat when the model has a chat template.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    seed: int = Field(0, description="Sampling seed; each problem's samples depend only on it and the problem.")
    ks: list[int] | None = Field(None, description="k values of pass@k and maj@k; default: powers of two up to n.")
    min_score: float | None = Field(None, ge=0, le=1, description="Exit 3 when a task's score is below this.")
    chunk_problems: int | None = Field(
        None, ge=1, description="Problems per engine call, appended to results.jsonl together (the resume "
        "granularity); default: 1024 with vllm (it schedules large batches itself), else max(64, engine.batch_size).")
    grading_timeout_s: float = Field(1.0, gt=0, description="Time limit of one symbolic equivalence check.")
    grader: GraderName = Field(
        "mathctl", description="Who decides correctness: mathctl's grader, or math-verify (an optional "
        "dependency: pip install math-verify) to reproduce numbers reported with it. Recorded in summary.json.")
    prm: str | None = Field(None, description="A reward model (a `mathctl rm` final/) that scores every sample: "
                            "adds `score` and best-of-k `bon@k`; the model under test of processbench.")
    prm_aggregate: Literal["last", "min"] = Field(
        "last", description="A process model's sample score: the last step's value or the minimum over steps.")
    prm_batch_size: int = Field(16, ge=1, description="Trajectories per reward-model forward pass.")
    per_task: dict[str, TaskSettings] = Field(default_factory=dict, description="Settings for one task, by name.")
    processbench: ProcessBenchSettings = Field(default_factory=ProcessBenchSettings)

    @field_validator("shard", "replica")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is not None:
            parse_shard(value)
        return value


class EvalConfig(Strict):
    """`mathctl eval`: recipe schema."""

    step: Literal["eval"] = "eval"
    model: ModelSpec | None = Field(None, description="The policy model that answers (required, except by "
                                    "processbench, which scores given solutions and ignores it).")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    eval: EvalSection = Field(default_factory=EvalSection)
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig, description="num_processes: engine replicas over all machines (the same as "
        "engine.data_parallel_size); num_machines > 1 and slurm: one slice of the problems per node, through --slurm.")
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        dp, procs = self.engine.data_parallel_size, self.launch.num_processes
        # num_processes == num_machines (one per node, the least launch allows) asks for no replicas
        if dp > 1 and procs > self.launch.num_machines and dp != procs:
            raise ValueError(f"launch.num_processes={procs} and engine.data_parallel_size={dp} both count the engine "
                             "replicas of eval; set one of them")
        if self.launch.num_machines > 1 and self.eval.shard:
            raise ValueError("launch.num_machines splits the problems by node already; drop eval.shard (--shard)")
        if is_processbench(self):
            self._check_processbench()
            return self
        if self.model is None:
            raise ValueError("eval needs a model to answer: set model.path (--model); only the processbench task "
                             "scores given solutions without one")
        from mathctl.benchmarks import get_benchmark

        unknown = []
        for name in list(self.eval.tasks) + list(self.eval.per_task):
            try:
                get_benchmark(name)
            except ConfigError:
                unknown.append(name)
        if unknown:
            from mathctl.benchmarks import BENCHMARKS

            raise ValueError(f"unknown eval task {', '.join(repr(u) for u in unknown)}; available: {', '.join(BENCHMARKS)}")
        return self

    def _check_processbench(self) -> None:
        """ProcessBench scores given solutions with eval.prm: the keys that generate or place engines do
        not apply, and are refused rather than ignored."""
        others = [t for t in self.eval.tasks if t.strip().lower() != PROCESSBENCH]
        if others:
            raise ValueError(f"processbench judges a reward model and runs alone; drop {', '.join(others)} from "
                             "eval.tasks (evaluate them in another run)")
        if not self.eval.prm:
            raise ValueError("processbench needs the process reward model to judge: set eval.prm (--prm)")
        unused = [f"eval.{key}" for key in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "prompt",
                                            "system_prompt", "ks") if getattr(self.eval, key) is not None]
        unused += ["eval.per_task"] if self.eval.per_task else []
        unused += ["eval.shard"] if self.eval.shard else []
        unused += ["eval.stop"] if self.eval.stop else []
        if self.replicas > 1 or self.launch.num_machines > 1:
            unused.append("engine.data_parallel_size / launch")
        if unused:
            raise ValueError(f"processbench scores given solutions in one process; {', '.join(unused)} do not apply "
                             "to it: drop them")

    def seeds(self) -> dict[str, int]:
        if is_processbench(self):
            return {"processbench_calibration": self.eval.processbench.calibration_seed}
        return {"eval": self.eval.seed}

    @property
    def replicas(self) -> int:
        """Engine replicas answering in parallel over all machines (launch.num_processes or
        engine.data_parallel_size)."""
        return max(self.engine.data_parallel_size, self.launch.num_processes)


def is_processbench(cfg: EvalConfig) -> bool:
    """Whether the run judges a process reward model on ProcessBench (mathctl/processbench.py) rather than a
    policy on benchmarks."""
    return any(t.strip().lower() == PROCESSBENCH for t in cfg.eval.tasks)


# `mathctl eval` places its own processes (engine replicas, mathctl/replicas.py; nodes, mathctl/nodes.py).
PLACES_ITS_PROCESSES = True


def parse_shard(text: str) -> tuple[int, int]:
    from mathctl.replicas import parse_slice

    return parse_slice(text)


def task_sampling(cfg: EvalConfig, name: str) -> tuple[SamplingConfig, str]:
    """The sampling and prompt template of one task: task default < eval.* < eval.per_task.NAME.*."""
    from mathctl.benchmarks import get_benchmark

    bench = get_benchmark(name)
    values: dict[str, Any] = {"n": bench.sampling.n, "temperature": bench.sampling.temperature,
                              "top_p": bench.sampling.top_p, "top_k": None,
                              "max_new_tokens": bench.sampling.max_new_tokens, "prompt": bench.prompt}
    layers = [cfg.eval] + [v for k, v in cfg.eval.per_task.items() if get_benchmark(k).name == bench.name]
    for layer in layers:
        for key in values:
            value = getattr(layer, key)
            if value is not None:
                values[key] = value
    prompt = values.pop("prompt")
    sampling = SamplingConfig(**values, stop=list(cfg.eval.stop), seed=cfg.eval.seed)
    return sampling, prompt


def default_ks(n: int) -> list[int]:
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


# --- metrics ----------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples (have {n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96): honest for small counts and for
    proportions near 0 or 1, where the normal approximation gives bounds outside [0, 1]."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def answer_classes(answers: Sequence[str | None], correct: Sequence[bool], *,
                   timeout_s: float = 1.0) -> list[int | None]:
    """Vote classes for maj@k, by the grader's equivalence rather than by spelling (`1/2` and `0.5` are one
    vote). Correct answers all equal the gold, so they form class 0; wrong ones share a class when the
    grader finds them equivalent (transitively). None marks a sample without an answer."""
    wrong = list(dict.fromkeys(a for a, ok in zip(answers, correct) if a and not ok))
    parent = list(range(len(wrong)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(wrong) > 1:
        from mathctl.grading import equivalent_many

        pairs = [(i, j) for i in range(len(wrong)) for j in range(i + 1, len(wrong))]
        verdicts = equivalent_many([(wrong[i], wrong[j]) for i, j in pairs], timeout_s=timeout_s)
        for (i, j), (same, _) in zip(pairs, verdicts):
            if same:
                parent[root(j)] = root(i)
    index = {a: i for i, a in enumerate(wrong)}
    return [None if not a else 0 if ok else 1 + root(index[a]) for a, ok in zip(answers, correct)]


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool],
                     classes: Sequence[int | None] | None = None) -> bool:
    """Majority vote over answer classes (`answer_classes`; computed here when not given): the largest class
    wins, ties go to the class reached first."""
    if classes is None:
        classes = answer_classes(answers, correct)
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, cls in enumerate(classes):
        if cls is None:
            continue
        counts[cls] = counts.get(cls, 0) + 1
        first.setdefault(cls, i)
    if not counts:
        return False
    winner = max(counts, key=lambda c: (counts[c], -first[c]))
    return bool(correct[first[winner]])


def best_of_correct(scores: Sequence[float], correct: Sequence[bool]) -> bool:
    """Best-of-k: the highest-scored sample decides; ties go to the earliest."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return bool(correct[best])


def summarize(records: list[dict[str, Any]], ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Scores of one task from its results.jsonl records."""
    if not records:
        return {"problems": 0, "score": 0.0}
    n = min(len(r["samples"]) for r in records)
    ks = sorted({k for k in (ks or default_ks(n)) if 1 <= k <= n}) or [1]
    scores, passes, majs, bons = [], {k: [] for k in ks}, {k: [] for k in ks}, {k: [] for k in ks}
    tokens = truncated = no_answer = 0
    seconds = 0.0
    has_scores = all("score" in s for r in records for s in r["samples"][:n])
    for record in records:
        samples = record["samples"][:n]
        correct = [bool(s["correct"]) for s in samples]
        c = sum(correct)
        scores.append(c / n)
        answers = [s.get("normalized") for s in samples]
        classes = answer_classes(answers, correct)
        for k in ks:
            passes[k].append(pass_at_k(n, c, k))
            majs[k].append(majority_correct(answers[:k], correct[:k], classes[:k]))
            if has_scores:
                bons[k].append(best_of_correct([s["score"] for s in samples[:k]], correct[:k]))
        tokens += sum(int(s.get("num_tokens", 0)) for s in samples)
        truncated += sum(s.get("finish_reason") == "length" for s in samples)
        no_answer += sum(s.get("extracted") is None for s in samples)
        seconds += float(record.get("seconds", 0.0))
    problems = len(records)
    score = sum(scores) / problems
    out: dict[str, Any] = {"problems": problems, "n": n, "score": score}
    out["accuracy" if n == 1 else f"avg@{n}"] = score
    if n == 1:  # problems are independent trials: the accuracy's 95% interval over problems
        out["ci95"] = [round(v, 4) for v in wilson_interval(sum(round(s) for s in scores), problems)]
    out["pass@k"] = {str(k): sum(v) / problems for k, v in passes.items()}
    out["maj@k"] = {str(k): sum(v) / problems for k, v in majs.items()}
    if has_scores:
        out["bon@k"] = {str(k): sum(v) / problems for k, v in bons.items()}
    samples_total = problems * n
    out.update(correct_samples=sum(round(s * n) for s in scores), samples=samples_total, no_answer=no_answer,
               truncated=truncated, generated_tokens=tokens, mean_tokens=tokens / samples_total,
               seconds=round(seconds, 3), tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else None)
    return out


# --- results file -----------------------------------------------------------------------------


def read_results(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of results.jsonl, a cut last line dropped (`mathctl.core.io.read_appended`)."""
    from mathctl.core.io import read_appended

    return read_appended(path, repair=repair)


# --- run --------------------------------------------------------------------------------------


def problem_seed(task: str, index: int) -> int:
    return zlib.crc32(f"{task}:{index}".encode())


def build_prompt(problem: str, template: str, cfg: EvalConfig, use_chat: bool):
    from mathctl.benchmarks import render_prompt

    text = render_prompt(template, problem)
    if not use_chat:
        return text
    messages = [{"role": "system", "content": cfg.eval.system_prompt}] if cfg.eval.system_prompt else []
    return messages + [{"role": "user", "content": text}]


def select_problems(problems: list, cfg: EvalConfig) -> list:
    chosen = [p for p in problems if p.gold is not None]
    if cfg.eval.limit is not None:
        chosen = chosen[: cfg.eval.limit]
    from mathctl.replicas import take_slice

    return take_slice(take_slice(chosen, cfg.eval.shard), cfg.eval.replica)


def load_tasks(cfg: EvalConfig) -> dict[str, list]:
    """Each task's problems for this run (limit and shard applied); fails before anything is written.
    For processbench: each ProcessBench split's records."""
    from mathctl.benchmarks import get_benchmark, load_problems, resolve_data_dir

    if is_processbench(cfg):
        from mathctl import processbench

        return processbench.load_splits(cfg.eval.processbench, resolve_data_dir(cfg.eval.data_dir), cfg.eval.limit)
    tasks = get_task_names(cfg)
    if not tasks:
        raise ConfigError("no eval task given", hint="mathctl eval math500 --model PATH (or eval.tasks in the recipe)")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"a task is listed twice: {', '.join(cfg.eval.tasks)}", hint="name each task once")
    data_dir = resolve_data_dir(cfg.eval.data_dir)
    return {name: select_problems(load_problems(get_benchmark(name), data_dir), cfg) for name in tasks}


class Scorer(Protocol):
    """Scores samples for best-of-N selection (a process or outcome reward model). Returns one float
    per sample; higher is better. With a PRM, the score is the last step's or the minimum step value."""

    def __call__(self, prompts: list[Any], samples: list[list[Any]]) -> list[list[float]]: ...


def run(cfg: EvalConfig, run_dir: RunDir, *, engine: Any = None, problems: dict[str, list] | None = None,
        scorer: Scorer | None = None) -> dict[str, Any]:
    """Evaluate every task of `cfg` into `run_dir`; returns the summary (also in summary.json).
    `engine` reuses a loaded engine (GRPO's in-loop eval); `problems` comes from `load_tasks`;
    `scorer` adds a `score` to every sample, and with it the best-of-k metric `bon@k`.
    A processbench config goes to `mathctl.processbench.run` (`problems`: its splits' records)."""
    if is_processbench(cfg):
        from mathctl import processbench

        return processbench.run(cfg, run_dir, splits=problems)
    from mathctl.core.console import log, progress
    from mathctl.engines import make_engine
    from mathctl.grading import shutdown_workers
    from mathctl.grading.graders import grade_with, require_grader

    require_grader(cfg.eval.grader)  # before any model is loaded

    if engine is None and cfg.launch.num_machines > 1:
        raise ConfigError(f"launch.num_machines={cfg.launch.num_machines}: eval answers one slice of the problems "
                          "per machine, started by the sbatch script", hint="add --slurm to write (and --submit to "
                          "submit) it, or run one --shard i/N per machine and `mathctl eval merge` them")
    problems = problems if problems is not None else load_tasks(cfg)
    if engine is None and cfg.replicas > 1:
        return run_replicated(cfg, run_dir, problems)
    tasks = list(problems)
    results_path = run_dir.path / RESULTS
    done = read_results(results_path, repair=True)
    finished = {(r["task"], r["index"]) for r in done}
    todo = {name: [p for p in problems[name] if (name, p.index) not in finished] for name in tasks}
    if finished:
        log(f"resuming: {len(finished)} problems already in {results_path}")

    own_engine = engine is None
    if own_engine:
        engine = make_engine(cfg.model, cfg.engine)
    if scorer is None and cfg.eval.prm:
        from mathctl.scoring import make_eval_scorer

        scorer = make_eval_scorer(cfg.eval.prm, cfg.eval.prm_aggregate, cfg.eval.prm_batch_size)
        log(f"best-of-n by reward model {cfg.eval.prm} ({cfg.eval.prm_aggregate} step score)")
    use_chat = cfg.eval.prompt_format == "chat" or (cfg.eval.prompt_format == "auto" and bool(engine.chat_template))
    if cfg.eval.prompt_format == "chat" and not engine.chat_template:
        raise ConfigError("eval.prompt_format=chat but the model has no chat template",
                          hint="set model.chat_template (e.g. chatml) or eval.prompt_format=raw")
    log(f"engine: {engine.backend}; prompts: {'chat template' if use_chat else 'raw text'}")
    if use_chat:
        from mathctl.core.io import atomic_write_text

        atomic_write_text(run_dir.path / "chat_template.jinja", engine.chat_template)  # the template actually used
    chunk_size = cfg.eval.chunk_problems or (1024 if engine.backend == "vllm" else max(64, cfg.engine.batch_size))
    try:
        total = sum(len(v) for v in todo.values())
        with progress("eval", total) as advance:
            for name in tasks:
                sampling, template = task_sampling(cfg, name)
                pending = todo[name]
                for start in range(0, len(pending), chunk_size):
                    chunk = pending[start: start + chunk_size]
                    began = time.perf_counter()
                    prompts = [build_prompt(p.problem, template, cfg, use_chat) for p in chunk]
                    outputs = engine.generate(prompts, sampling, prompt_seeds=[problem_seed(name, p.index) for p in chunk])
                    texts = [s.text for samples in outputs for s in samples]
                    golds = [p.gold for p in chunk for _ in range(sampling.n)]
                    grades = grade_with(cfg.eval.grader, texts, golds, timeout_s=cfg.eval.grading_timeout_s)
                    scores = scorer(prompts, outputs) if scorer is not None else None
                    per_problem = (time.perf_counter() - began) / len(chunk)
                    flat = iter(grades)
                    with results_path.open("a", encoding="utf-8") as handle:
                        for k, (problem, samples) in enumerate(zip(chunk, outputs)):
                            record = {
                                "task": name, "index": problem.index, "id": problem.id, "problem": problem.problem,
                                "gold": problem.gold, **({"extra": problem.extra} if problem.extra else {}),
                                "samples": [_sample_record(s, next(flat)) for s in samples],
                                "seconds": round(per_problem, 4),
                            }
                            if scores is not None:
                                for sample, value in zip(record["samples"], scores[k]):
                                    sample["score"] = float(value)
                            record["num_correct"] = sum(s["correct"] for s in record["samples"])
                            handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                        handle.flush()
                    correct = sum(g.correct for g in grades)
                    advance(len(chunk), task=name, acc=f"{correct / max(1, len(grades)):.3f}")
    finally:
        if own_engine:
            engine.close()
        shutdown_workers()
    from mathctl.models import template_digest

    return write_summary(cfg, run_dir, tasks, prompt_format="chat" if use_chat else "raw", backend=engine.backend,
                         chat_template_digest=template_digest(engine.chat_template) if use_chat else None)


def _sample_record(sample, grade) -> dict[str, Any]:
    return {"text": sample.text, "extracted": grade.extracted, "normalized": grade.pred_normalized,
            "correct": grade.correct, "reason": grade.reason, "finish_reason": sample.finish_reason,
            "num_tokens": sample.num_tokens}


def write_summary(cfg: EvalConfig, run_dir: RunDir, tasks: list[str], *, prompt_format: str | None,
                  backend: str | None, chat_template_digest: str | None,
                  shards: list[str] | None = None, replicas: list[str] | None = None,
                  nodes: list[str] | None = None) -> dict[str, Any]:
    """Score every task from results.jsonl, write summary.json, mark the run completed."""
    from mathctl.benchmarks import get_benchmark
    from mathctl.grading.graders import grader_version

    records = read_results(run_dir.path / RESULTS)
    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    for record in records:
        if record["task"] in by_task:
            by_task[record["task"]].append(record)
    out_tasks = {}
    for name in tasks:
        sampling, template = task_sampling(cfg, name)
        ks = cfg.eval.ks or default_ks(sampling.n)
        bench = get_benchmark(name)
        entry = summarize(sorted(by_task[name], key=lambda r: r["index"]), ks)
        entry.update(version=bench.version, sampling=sampling.model_dump(mode="json"), prompt=template)
        out_tasks[name] = entry
    summary: dict[str, Any] = {
        "status": "completed", "model": cfg.model.path, "run_dir": str(run_dir.path), "backend": backend,
        "prompt_format": prompt_format, "chat_template_digest": chat_template_digest,
        "shard": cfg.eval.shard, "grader": {"name": cfg.eval.grader, "version": grader_version(cfg.eval.grader)},
        "tasks": out_tasks,
        "score": {name: entry["score"] for name, entry in out_tasks.items()},
    }
    if shards:
        summary["merged_from"] = shards
    if replicas:
        summary["replicas"] = replicas
    if nodes:
        summary["nodes"] = nodes
    gate = cfg.eval.min_score
    failing = [name for name, entry in out_tasks.items() if gate is not None and entry["score"] < gate]
    if gate is not None:
        summary["min_score"] = gate
        summary["gate"] = "failed" if failing else "passed"
    if cfg.eval.replica is None:  # a replica's numbers reach the trackers through the merged run
        run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    for name, entry in out_tasks.items():
        run_dir.log_metrics({"task": name, **{k: v for k, v in entry.items() if k not in ("prompt", "sampling")}})
    run_dir.finish("completed", summary)
    return summary


def check_gate(summary: dict[str, Any]) -> None:
    if summary.get("benchmark") == PROCESSBENCH:
        from mathctl import processbench

        return processbench.check_gate(summary)
    if summary.get("gate") == "failed":
        gate = summary["min_score"]
        low = ", ".join(f"{name} {entry['score']:.4f}" for name, entry in summary["tasks"].items() if entry["score"] < gate)
        raise GateFailed(f"score below --min-score {gate}: {low}", hint="the eval ran and its results are in the run folder")


def render_table(summary: dict[str, Any]):
    if summary.get("benchmark") == PROCESSBENCH:
        from mathctl import processbench

        return processbench.render_table(summary)
    from rich.table import Table

    table = Table(title=f"eval: {summary['model']}", title_justify="left")
    for column in ("task", "problems", "n", "score", "pass@k", "maj@k", "tokens/sample", "truncated", "seconds"):
        table.add_column(column, justify="left" if column in ("task", "pass@k", "maj@k") else "right")
    for name, entry in summary["tasks"].items():
        if not entry.get("problems"):
            table.add_row(name, "0", "-", "-", "-", "-", "-", "-", "-")
            continue
        label = "acc" if entry["n"] == 1 else f"avg@{entry['n']}"
        table.add_row(
            name, str(entry["problems"]), str(entry["n"]), f"{entry['score']:.4f} ({label})",
            " ".join(f"@{k}={v:.3f}" for k, v in entry["pass@k"].items()),
            " ".join(f"@{k}={v:.3f}" for k, v in entry["maj@k"].items()),
            f"{entry['mean_tokens']:.0f}", str(entry["truncated"]), f"{entry['seconds']:.1f}",
        )
    return table


# --- data-parallel replicas and shards ---------------------------------------------------------


def run_replicated(cfg: EvalConfig, run_dir: RunDir, problems: dict[str, list]) -> dict[str, Any]:
    """`engine.data_parallel_size` engines, each answering every N-th problem in a worker of its own
    (mathctl/replicas.py); their results.jsonl merged into this run's, then scored as one run."""
    from mathctl.replicas import check_layout, run_replicas

    count = cfg.replicas
    check_layout(run_dir, count)
    configs = []
    for k in range(count):
        sub = cfg.model_copy(deep=True)
        sub.engine.data_parallel_size = 1
        sub.launch = LaunchConfig()
        sub.eval.replica = f"{k}/{count}"
        sub.tracking.report_to = []
        sub.eval.min_score = None  # the gate is the merged run's
        configs.append(sub)
    total = sum(len(v) for v in problems.values())
    folders = run_replicas("eval", configs, run_dir.path, engine=cfg.engine, rows_file=RESULTS, total=total,
                           label="eval")
    return _merge_runs(cfg, run_dir, folders, list(problems), replicas=[str(f) for f in folders])


def _merge_runs(cfg: EvalConfig, run_dir: RunDir, folders: list[Path], tasks: list[str], **origin) -> dict[str, Any]:
    """The finished runs of disjoint problems (replicas, nodes) into `run_dir`, scored as one run."""
    from mathctl.core.io import atomic_write_text

    write_merged_results(folders, tasks, run_dir.path / RESULTS)
    head = json.loads((folders[0] / "summary.json").read_text())
    template = folders[0] / "chat_template.jinja"
    if template.is_file():
        atomic_write_text(run_dir.path / "chat_template.jinja", template.read_text())
    return write_summary(cfg, run_dir, tasks, prompt_format=head.get("prompt_format"), backend=head.get("backend"),
                         chat_template_digest=head.get("chat_template_digest"), **origin)


def node_config(cfg: EvalConfig, node: int, machines: int) -> EvalConfig:
    """Node `node` of `machines` (mathctl/nodes.py): every M-th problem from `node`, the same split as
    `--shard node/M`, answered by this node's share of the engine replicas."""
    from mathctl.nodes import per_node_replicas

    sub = cfg.model_copy(deep=True)
    sub.engine.data_parallel_size = per_node_replicas(cfg.replicas, machines)
    sub.launch = LaunchConfig()
    sub.eval.shard = f"{node}/{machines}"
    sub.eval.min_score = None  # the gate is the merged run's
    sub.tracking.report_to = []  # and so are the trackers
    return sub


def merge_nodes(cfg: EvalConfig, run_dir: RunDir, folders: list[Path]) -> dict[str, Any]:
    return _merge_runs(cfg, run_dir, folders, get_task_names(cfg), nodes=[str(f) for f in folders])


def merge(shard_dirs: list[Path], out: Path, *, min_score: float | None = None) -> dict[str, Any]:
    """Combine the runs of `--shard i/N` (every i once, all completed) into `out`."""
    import yaml

    from mathctl.core.config import dump_yaml, validate

    if not shard_dirs:
        raise ConfigError("eval merge needs the shard run folders", hint="mathctl eval merge runs/eval/a-0 runs/eval/a-1 --run-dir runs/eval/a")
    configs = []
    for folder in shard_dirs:
        recipe = folder / "recipe.yaml"
        if not recipe.is_file():
            raise ConfigError(f"{folder} is not an eval run folder (no recipe.yaml)", hint="give the folders the shard runs wrote")
        cfg = validate(EvalConfig, yaml.safe_load(recipe.read_text()) or {}, source=str(recipe))
        meta = RunDir(folder).read_meta()
        if meta.get("status") != "completed":
            raise ConfigError(f"shard {folder} has not completed (status {meta.get('status')})",
                              hint=f"finish it first: mathctl eval --resume --run-dir {folder}")
        configs.append(cfg)
    specs = []
    for folder, cfg in zip(shard_dirs, configs):
        if cfg.eval.shard is None:
            raise ConfigError(f"{folder} is not a shard (no eval.shard)", hint="merge only runs started with --shard i/N")
        specs.append(parse_shard(cfg.eval.shard))
    total = {n for _, n in specs}
    if len(total) != 1:
        raise ConfigError(f"the shards split into different counts: {sorted(total)}", hint="merge shards of one i/N split")
    (n_shards,) = total
    seen = sorted(i for i, _ in specs)
    if seen != list(range(n_shards)):
        missing = sorted(set(range(n_shards)) - set(seen))
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise ConfigError(f"shards of {n_shards}: missing {missing or 'none'}, given twice {twice or 'none'}",
                          hint="give every shard 0..N-1 exactly once")
    def comparable(cfg: EvalConfig) -> dict[str, Any]:
        data = cfg.model_dump(mode="json")
        data.pop("output")
        data["eval"].pop("shard")
        return data

    for folder, cfg in zip(shard_dirs[1:], configs[1:]):
        if comparable(cfg) != comparable(configs[0]):
            raise ConfigError(f"{folder} ran with other settings than {shard_dirs[0]}",
                              hint="merge shards of one eval command (same model, tasks and sampling)")
    base = configs[0].model_copy(deep=True)
    base.eval.shard = None
    if min_score is not None:
        base.eval.min_score = min_score
    tasks = get_task_names(base)
    run = RunDir.create(out, recipe_yaml=dump_yaml(base), step="eval", resume=False, seeds=base.seeds())
    write_merged_results(shard_dirs, tasks, run.path / RESULTS)
    head_path = shard_dirs[0] / "summary.json"
    head = json.loads(head_path.read_text()) if head_path.is_file() else {}
    return write_summary(base, run, tasks, prompt_format=head.get("prompt_format"), backend=head.get("backend"),
                         chat_template_digest=head.get("chat_template_digest"), shards=[str(f) for f in shard_dirs])


def write_merged_results(folders: list[Path], tasks: list[str], out: Path) -> None:
    """The results.jsonl of several runs of disjoint problems (shards, replicas) as one, in task then problem
    order, written atomically to `out`."""
    from mathctl.core.io import atomic_write_text

    order = {t: i for i, t in enumerate(tasks)}
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for folder in folders:
        for record in read_results(folder / RESULTS):
            records[(record["task"], record["index"])] = record
    merged = sorted(records.values(), key=lambda r: (order.get(r["task"], len(order)), r["index"]))
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in merged))


def get_task_names(cfg: EvalConfig) -> list[str]:
    from mathctl.benchmarks import get_benchmark

    if is_processbench(cfg):
        return [PROCESSBENCH]
    return [get_benchmark(t).name for t in cfg.eval.tasks]
