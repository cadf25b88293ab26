"""`mathctl mcts-sample`: rStar-Math tree search over problems, and `--rounds N` self-evolution.

One round (`run_round`): problems -> trees grown in batches (mathctl/mcts.py) with the policy on the
engine, code steps in the sandbox (mathctl/sandbox.py), the PPM (a `mathctl rm` final/) as value
and the grader for terminal rewards -> files in the round folder, appended batch by batch:

    trees.jsonl      every tree: each node's text, visits, Q, PPM value, terminal reason, answer, correctness
    sft.jsonl        per problem the top correct root-to-leaf traces ({problem, response}: `mathctl sft` reads it)
    ppm_pairs.jsonl  rStar's preference pairs ({question, prefix, pos, neg, pos_count, neg_count}: `mathctl rm`)
    batches.jsonl    per batch: problems, engine calls, executions, seconds (the summary adds them up)
    summary.json     solve rate (a correct answer anywhere in the tree), accuracy (the chosen answer),
                     mean tree size, engine calls, seconds

A resumed round (`--resume`) skips the problems already in trees.jsonl and drops their half-written
rows from the other files first. `--shard i/N` takes every N-th problem; `mathctl mcts-sample merge`
combines the shards' folders.

`--rounds N` (`run_rounds`): round 1 searches with the given policy (and PPM, if any); after each
round but the last, `sft` trains the next policy on the round's sft.jsonl and `rm` trains the next
PPM from that policy on its ppm_pairs.jsonl (rStar re-initialises the PPM from the policy each round);
the next round searches with both and `rounds.search_overrides`. Every piece lives in
`round_K/` (`round_K/sft`, `round_K/rm` are ordinary run folders) and a finished piece is skipped
when the run is resumed. The per-round solve rates go to rounds.jsonl, a table and plots/solve_rate.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mathctl.core.config import EngineConfig, LaunchConfig, ModelSpec, OutputConfig, Strict, TrackingConfig
from mathctl.core.console import log, print_table, progress, warn
from mathctl.core.errors import ConfigError, DataError
from mathctl.core.io import append_jsonl, atomic_write_json, atomic_write_text
from mathctl.core.rundir import RunDir
from mathctl.mcts import PairsConfig, SearchConfig, StepFormat
from mathctl.rows import SyntheticData

FILES = ("trees.jsonl", "sft.jsonl", "ppm_pairs.jsonl", "batches.jsonl")


# --- config ---------------------------------------------------------------------------------------


class MCTSData(Strict):
    """The problems searched."""

    source: str = Field("synthetic", description="`synthetic`; a .jsonl/.json/.parquet file or data folder with a "
                        "problem and a gold answer per row; or an eval task name (math500, gsm8k, ...).")
    prompt_template: str = Field("{prompt}", description="User turn built from the problem; `{prompt}` is replaced. "
                                 "The rounds pass it to sft and rm so policy, PPM and search see the same text.")
    prompt_field: str | None = Field(None, description="Field with the problem; auto: problem, question, query, prompt.")
    answer_field: str | None = Field(None, description="Field with the gold answer; auto: answer, expected_answer, "
                                     "gold, final_answer, else the last \\boxed{} of solution.")
    data_dir: str | None = Field(None, description="Local benchmark copies (NAME/test.jsonl) for a task source.")
    limit: int | None = Field(None, ge=1, description="Only the first N problems.")
    shard: str | None = Field(None, description="`i/N`: every N-th problem from i; combine with `mcts-sample merge`.")
    replica: str | None = Field(None, description="Set by data-parallel search for its workers (engine.data_parallel_"
                                "size): `k/N` of this run's problems after the shard; not set by hand.")
    synthetic: SyntheticData = Field(default_factory=SyntheticData)

    @field_validator("shard", "replica")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is not None:
            from mathctl.replicas import parse_slice

            parse_slice(value)
        return value


class SandboxSection(Strict):
    """Limits of each execution of model-written code (mathctl/sandbox.py)."""

    wall_s: float = Field(10.0, gt=0, description="Wall-clock seconds per execution (rStar: 30 s inner, 60 s outer).")
    cpu_s: float = Field(5.0, gt=0, description="CPU seconds per execution.")
    memory_mb: int = Field(1024, ge=64, description="Address-space limit per execution.")
    max_output_chars: int = Field(1024, ge=16, description="Longer output is cut in the middle (rStar: 1024).")
    workers: int | None = Field(None, ge=1, description="Executions run in parallel; default: the CPU count.")
    allow_weak: bool = Field(False, description="Run model-written code even where the kernel offers neither "
                             "Landlock nor a separate uid in a network namespace (then only rlimits and an "
                             "in-process audit hook guard it); off, such a machine is a user error.")

    def limits(self):
        from mathctl.sandbox import SandboxLimits

        return SandboxLimits(wall_s=self.wall_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb,
                             max_output_chars=self.max_output_chars)


class RoundsConfig(Strict):
    """`--rounds N` self-evolution."""

    count: int = Field(1, ge=1, description="Rounds; `--rounds N` sets it.")
    sft_recipe: str = Field("rstar-sft", description="Recipe that trains the next policy on a round's sft.jsonl.")
    sft_overrides: list[str] = Field(default_factory=list, description="Overrides for that sft run.")
    sft_init: Literal["previous", "base"] = Field(
        "previous", description="previous: fine-tune the round's policy; base: start again from rounds.base_model "
        "(rStar's README trains every round from Qwen2.5-Math-7B).")
    base_model: str | None = Field(None, description="With sft_init=base: the model each round's SFT starts from.")
    rm_recipe: str = Field("rstar-ppm", description="Recipe that trains the next PPM on a round's ppm_pairs.jsonl.")
    rm_overrides: list[str] = Field(default_factory=list, description="Overrides for that rm run.")
    search_overrides: list[str] = Field(default_factory=list, description="Overrides of this recipe from round 2 on "
                                        "(rStar's sft_sample_mcts settings), e.g. search.temperature=1.0.")

    @model_validator(mode="after")
    def _check(self) -> RoundsConfig:
        if self.sft_init == "base" and not self.base_model:
            raise ValueError("rounds.sft_init=base needs rounds.base_model")
        return self


class MCTSConfig(Strict):
    """`mathctl mcts-sample` recipe."""

    step: Literal["mcts"] = "mcts"
    model: ModelSpec
    prm: str | None = Field(None, description="Process preference model (a `mathctl rm` final/): value prior of new "
                            "nodes, terminal value in evaluation, beam scores. `--prm` sets it.")
    data: MCTSData = Field(default_factory=MCTSData)
    steps: StepFormat = Field(default_factory=StepFormat)
    search: SearchConfig = Field(default_factory=SearchConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    sft_traces: int = Field(2, ge=1, description="Correct traces kept per problem for sft.jsonl (rStar: 2).")
    sft_require_output_match: bool = Field(
        False, description="Drop correct traces whose boxed answer differs from their last code output (the "
        "right number for a wrong reason); rStar keeps them.")
    sandbox: SandboxSection = Field(default_factory=SandboxSection)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    grading_timeout_s: float = Field(1.0, gt=0, description="Time limit of one symbolic equivalence check.")
    seed: int = Field(0, description="Sampling seed: a node's continuations depend only on it, the problem and the node.")
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> MCTSConfig:
        if "{prompt}" not in self.data.prompt_template:
            raise ValueError("data.prompt_template must contain {prompt}")
        if self.launch.num_machines > 1 and (self.rounds.count > 1 or self.data.shard):
            raise ValueError("launch.num_machines > 1 splits one round's problems by node (--slurm); it takes "
                             "neither --rounds > 1 (training between rounds runs on one machine) nor --shard")
        dp, procs = self.engine.data_parallel_size, self.launch.num_processes
        # num_processes == num_machines (one per node, the least launch allows) asks for no replicas
        if dp > 1 and procs > self.launch.num_machines and dp != procs:
            raise ValueError(f"launch.num_processes={procs} and engine.data_parallel_size={dp} both count the engine "
                             "replicas of mcts-sample; set one of them")
        if self.search.mode == "beam" and not self.prm and self.rounds.count == 1:
            raise ValueError("search.mode=beam ranks steps with a PPM; give one with --prm (or prm=PATH)")
        if self.search.terminal_reward == "ppm" and not self.prm and self.rounds.count == 1:
            raise ValueError("search.terminal_reward=ppm needs a PPM; give --prm, or use terminal_reward=gold")
        if self.rounds.count > 1 and self.data.shard:
            raise ValueError("--rounds trains between rounds on all problems; run shards with --rounds 1 and merge them")
        return self

    def seeds(self) -> dict[str, int]:
        return {"search": self.seed, "synthetic": self.data.synthetic.seed}

    @property
    def replicas(self) -> int:
        """Engine replicas searching in parallel (launch.num_processes or engine.data_parallel_size)."""
        return max(self.engine.data_parallel_size, self.launch.num_processes)


# `mathctl mcts-sample` places its own processes (engine replicas, mathctl/replicas.py): the CLI runs it in one
# process whatever launch.num_processes says, instead of starting ranks through accelerate.
PLACES_ITS_PROCESSES = True


# --- problems -------------------------------------------------------------------------------------

_PROMPT_FIELDS = ("problem", "question", "query", "prompt")
_ANSWER_FIELDS = ("answer", "expected_answer", "gold", "final_answer")


def load_problems(data: MCTSData) -> list[dict[str, Any]]:
    """[{id, question, gold}] after limit and shard; a row without a problem or answer exits 2 naming it."""
    from mathctl.benchmarks import BENCHMARKS

    if data.source in BENCHMARKS:
        from mathctl.benchmarks import get_benchmark, resolve_data_dir
        from mathctl.benchmarks import load_problems as load_bench

        rows = [{"id": f"{data.source}-{p.index}", "question": p.problem, "gold": p.gold}
                for p in load_bench(get_benchmark(data.source), resolve_data_dir(data.data_dir)) if p.gold is not None]
    else:
        from mathctl.grading import extract_boxed_all
        from mathctl.rows import load_rows

        raw = load_rows(data.source, synthetic=data.synthetic)
        rows = []
        for i, row in enumerate(raw):
            key = data.prompt_field or next((k for k in _PROMPT_FIELDS if isinstance(row.get(k), str)), None)
            if key is None or not isinstance(row.get(key), str):
                raise DataError(f"row {i + 1} of {data.source} has no problem field (has {sorted(row)})",
                                hint="set data.prompt_field")
            answer_key = data.answer_field or next((k for k in _ANSWER_FIELDS if row.get(k) not in (None, "")), None)
            gold = row.get(answer_key) if answer_key else None
            if gold in (None, "") and isinstance(row.get("solution"), str):
                boxes = extract_boxed_all(row["solution"])
                gold = boxes[-1] if boxes else None
            if gold in (None, ""):
                raise DataError(f"row {i + 1} of {data.source} has no gold answer", hint="set data.answer_field")
            rows.append({"id": str(row.get("id", f"row-{i}")), "question": row[key],
                         "gold": gold if isinstance(gold, list) else str(gold)})
    if not rows:
        raise DataError(f"{data.source} holds no problems", hint="check data.source")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        for i, r in enumerate(rows):
            r["id"] = f"{r['id']}#{i}"
    if data.limit:
        rows = rows[: data.limit]
    from mathctl.replicas import take_slice

    return take_slice(take_slice(rows, data.shard), data.replica)


# --- one round ------------------------------------------------------------------------------------


def _done_ids(folder: Path) -> set[str]:
    """Problems finished in an earlier attempt; rows of unfinished ones are dropped from the other files."""
    from mathctl.core.io import iter_jsonl

    trees = folder / "trees.jsonl"
    if not trees.is_file():
        return set()
    done = set()
    good_lines = []
    for line in trees.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill
        done.add(row["id"])
        good_lines.append(line + "\n")
    atomic_write_text(trees, "".join(good_lines))
    for name in ("sft.jsonl", "ppm_pairs.jsonl"):
        path = folder / name
        if path.is_file():
            try:
                kept = [json.dumps(row) + "\n" for _, row in iter_jsonl(path) if row.get("id") in done]
            except DataError:  # a cut last line: keep what parses
                kept = []
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    if row.get("id") in done:
                        kept.append(json.dumps(row) + "\n")
            atomic_write_text(path, "".join(kept))
    return done


def render_header(tokenizer, question: str, template: str) -> str:
    from mathctl.scoring import render_prompt

    return render_prompt(tokenizer, question, template)


def run_round(cfg: MCTSConfig, folder: Path, *, policy: str, prm: str | None, label: str = "search",
              problems: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Search every problem of `cfg.data` (or `problems`, loaded from it already) with `policy` (and `prm`);
    write the round's files into `folder`."""
    from mathctl.core.config import SamplingConfig
    from mathctl.engines import make_engine
    from mathctl.grading import is_equivalent_batch
    from mathctl.mcts import Callbacks, Searcher, Tree, ppm_pairs, sft_traces, tree_record
    from mathctl.sandbox import Sandbox

    folder.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg.data) if problems is None else problems
    done = _done_ids(folder)
    for name in ("sft.jsonl", "ppm_pairs.jsonl"):  # always there (empty when nothing qualifies): scripts rely on them
        (folder / name).touch()
    todo = [p for p in problems if p["id"] not in done]
    if done:
        log(f"{label}: {len(done)} problems done earlier, {len(todo)} to go")
    if cfg.search.mode == "beam" and not prm:
        raise ConfigError("search.mode=beam ranks steps with a PPM, and this round has none", hint="give --prm PATH")
    if cfg.replicas > 1 and todo:
        return _run_round_replicated(cfg, folder, policy=policy, prm=prm, label=label, problems=problems)
    engine = scorer = None
    sandbox = Sandbox(cfg.sandbox.limits(), allow_weak=cfg.sandbox.allow_weak)
    isolation = None
    try:
        if todo:
            engine = make_engine(cfg.model.model_copy(update={"path": policy}), cfg.engine)
            tokenizer = engine.tokenizer
            if cfg.model.chat_template != "tokenizer" or not getattr(tokenizer, "chat_template", None):
                from mathctl.models import resolve_chat_template

                resolve_chat_template(cfg.model, tokenizer)
            if prm:
                from mathctl.scoring import RewardScorer

                scorer = RewardScorer.from_pretrained(prm, device=None if cfg.engine.device == "auto" else cfg.engine.device)

            def generate(prompts, seeds, sampling):
                return engine.generate(prompts, sampling, prompt_seeds=seeds)

            def execute(programs):
                return sandbox.run_many(programs, workers=cfg.sandbox.workers)

            def score(items):
                return [values[-1] if values else 0.0 for values in scorer.score_many(items)]

            def grade(answers, golds):
                return is_equivalent_batch(answers, golds, timeout_s=cfg.grading_timeout_s)

            callbacks = Callbacks(generate=generate, execute=execute if cfg.steps.kind == "code" else None,
                                  score=score if scorer is not None else None, grade=grade)
            size = cfg.search.batch_problems
            with progress(f"{label} ({cfg.search.mode})", len(todo)) as advance:
                for start in range(0, len(todo), size):
                    batch = todo[start:start + size]
                    began = time.perf_counter()
                    searcher = Searcher(cfg.search, cfg.steps, callbacks, seed=cfg.seed, sampling_factory=SamplingConfig)
                    trees = [Tree(id=p["id"], question=p["question"], gold=p["gold"],
                                  prompt=render_header(tokenizer, p["question"], cfg.data.prompt_template)) for p in batch]
                    searcher.run(trees)
                    records = [tree_record(t, cfg.search.mode) for t in trees]
                    for tree in trees:
                        for row in sft_traces(tree, cfg.sft_traces, require_output_match=cfg.sft_require_output_match):
                            append_jsonl(folder / "sft.jsonl", row)
                        for row in ppm_pairs(tree, cfg.pairs):
                            append_jsonl(folder / "ppm_pairs.jsonl", row)
                    for record in records:  # trees.jsonl last: a problem counts as done once its tree is written
                        append_jsonl(folder / "trees.jsonl", record)
                    s = searcher.stats
                    append_jsonl(folder / "batches.jsonl", {
                        "problems": len(batch), "engine_calls": s.engine_calls, "generated": s.generated,
                        "executions": s.executions, "ppm_calls": s.ppm_calls, "ppm_scored": s.ppm_scored,
                        "seconds": round(time.perf_counter() - began, 3)})
                    solved = sum(r["solved"] for r in records)
                    advance(len(batch), solved=f"{solved}/{len(batch)}", calls=s.engine_calls)
        if cfg.steps.kind == "code":
            isolation = sandbox.isolation
    finally:
        sandbox.close()
        if scorer is not None:
            scorer.close()
        if engine is not None:
            engine.close()
    summary = round_summary(folder, cfg.search.mode)
    summary.update(policy=policy, prm=prm, sandbox=isolation)
    atomic_write_json(folder / "summary.json", summary)
    return summary


def _run_round_replicated(cfg: MCTSConfig, folder: Path, *, policy: str, prm: str | None, label: str,
                          problems: list[dict[str, Any]]) -> dict[str, Any]:
    """One round searched by `cfg.replicas` engines in workers of their own (mathctl/replicas.py), each on every
    N-th problem; their files merged into `folder` in problem order, as one process would have written them."""
    from mathctl.replicas import run_replicas

    count = cfg.replicas
    configs = []
    for k in range(count):
        data = cfg.model_dump(mode="json")
        data["model"]["path"], data["prm"] = policy, prm
        data["rounds"]["count"] = 1
        data["data"]["replica"] = f"{k}/{count}"
        data["engine"]["data_parallel_size"] = 1
        data["launch"]["num_processes"] = 1
        data["tracking"]["report_to"] = []  # the merged run reports
        configs.append(MCTSConfig.model_validate(data))
    folders = run_replicas("mcts", configs, folder, engine=cfg.engine, rows_file="trees.jsonl", total=len(problems),
                           label=f"{label} ({cfg.search.mode})")
    summary = _merge_folders(cfg, folder, folders, problems)
    summary.update(policy=policy, prm=prm, replicas=[str(f) for f in folders])
    atomic_write_json(folder / "summary.json", summary)
    return summary


def _merge_folders(cfg: MCTSConfig, folder: Path, folders: list[Path], problems: list[dict[str, Any]]) -> dict[str, Any]:
    """The files of finished searches of disjoint problems (replicas, nodes) merged into `folder` in problem order,
    as one process would have written them; returns the round's summary."""
    from mathctl.core.io import iter_jsonl

    order = {p["id"]: i for i, p in enumerate(problems)}
    for name in FILES:
        rows = [row for sub in folders if (sub / name).is_file() for _, row in iter_jsonl(sub / name)]
        if name != "batches.jsonl":
            rows.sort(key=lambda row: order.get(row.get("id"), len(order)))  # stable: a problem's rows keep their order
        atomic_write_text(folder / name, "".join(json.dumps(row) + "\n" for row in rows))
    head = json.loads((folders[0] / "summary.json").read_text())
    summary = round_summary(folder, cfg.search.mode)
    summary.update(sandbox=head.get("sandbox"))
    return summary


def node_config(cfg: MCTSConfig, node: int, machines: int) -> MCTSConfig:
    """Node `node` of `machines` (mathctl/nodes.py): every M-th problem from `node`, the same split as
    `--shard node/M`, searched by this node's share of the engine replicas."""
    from mathctl.nodes import per_node_replicas

    data = cfg.model_dump(mode="json")
    data["data"]["shard"] = f"{node}/{machines}"
    data["engine"]["data_parallel_size"] = per_node_replicas(cfg.replicas, machines)
    data["launch"].update(num_machines=1, num_processes=1)
    data["tracking"]["report_to"] = []  # the merged run reports
    return MCTSConfig.model_validate(data)


def merge_nodes(cfg: MCTSConfig, run_dir: RunDir, folders: list[Path]) -> dict[str, Any]:
    summary = _merge_folders(cfg, run_dir.path, folders, load_problems(cfg.data))
    summary.update(policy=cfg.model.path, prm=cfg.prm, nodes=[str(f) for f in folders], run_dir=str(run_dir.path))
    print_table(rounds_table([{"round": 1, **summary}]))
    run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    _log_round(run_dir, summary)
    return summary


def _log_round(run_dir: RunDir, summary: dict[str, Any]) -> None:
    """A one-round search's numbers as a metrics record (round 1), for metrics.jsonl and the trackers."""
    run_dir.log_metrics({"round": 1, **{key: value for key, value in summary.items()
                                        if isinstance(value, (int, float)) and not isinstance(value, bool)}})


def check_sandbox(section: SandboxSection) -> dict[str, Any]:
    """What isolation the kernel gives model-written code on this machine (one empty program in the sandbox);
    weak isolation is a user error unless `sandbox.allow_weak` is set."""
    from mathctl.confine import weak_reason
    from mathctl.sandbox import Sandbox

    box = Sandbox(section.limits(), allow_weak=True)
    box.preload = ()  # the probe imports nothing
    try:
        isolation = box.isolation
    finally:
        box.close()
    if isolation["level"] == "weak":
        missing, fix = weak_reason(isolation)
        if not section.allow_weak:
            raise ConfigError(f"the sandbox cannot isolate model-written code on this machine: {missing}", hint=fix)
        warn(f"sandbox: weak isolation ({missing}); code runs anyway because sandbox.allow_weak is true")
    else:
        log(f"sandbox: {isolation['level']} (Landlock ABI {isolation['landlock'] or 'none'}, seccomp "
            f"{'on' if isolation['seccomp'] else 'off'}, uid {isolation['uid']}, network namespace "
            f"{'yes' if isolation['netns'] else 'no'})")
    return isolation


def round_summary(folder: Path, mode: str) -> dict[str, Any]:
    """Solve rate, accuracy, tree sizes and costs from a round folder's files."""
    from mathctl.core.io import iter_jsonl

    trees = [row for _, row in iter_jsonl(folder / "trees.jsonl")] if (folder / "trees.jsonl").is_file() else []
    batches = [row for _, row in iter_jsonl(folder / "batches.jsonl")] if (folder / "batches.jsonl").is_file() else []
    count = lambda name: sum(1 for _ in iter_jsonl(folder / name)) if (folder / name).is_file() else 0  # noqa: E731
    n = len(trees)
    totals = {key: sum(b.get(key, 0) for b in batches)
              for key in ("engine_calls", "generated", "executions", "ppm_calls", "ppm_scored", "seconds")}
    reasons: dict[str, int] = {}
    for row in trees:
        for node in row["nodes"]:
            if node["terminal"]:
                reasons[node["reason"]] = reasons.get(node["reason"], 0) + 1
    return {
        "status": "completed", "mode": mode, "problems": n,
        "solved": sum(r["solved"] for r in trees), "correct": sum(r["correct"] for r in trees),
        "solve_rate": round(sum(r["solved"] for r in trees) / n, 4) if n else 0.0,
        "accuracy": round(sum(r["correct"] for r in trees) / n, 4) if n else 0.0,
        "mean_tree_size": round(sum(r["num_nodes"] for r in trees) / n, 2) if n else 0.0,
        "terminal_reasons": reasons, "sft_rows": count("sft.jsonl"), "ppm_pairs": count("ppm_pairs.jsonl"),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
        "seconds_per_problem": round(totals["seconds"] / n, 4) if n else 0.0,
        "engine_calls_per_problem": round(totals["engine_calls"] / n, 3) if n else 0.0,
    }


# --- rounds ---------------------------------------------------------------------------------------


def _with_overrides(cfg: MCTSConfig, overrides: list[str]) -> MCTSConfig:
    from mathctl.core.config import parse_override, set_dotted, validate

    if not overrides:
        return cfg
    data = cfg.model_dump(mode="json")
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(data, keys, value)
    return validate(MCTSConfig, data, source="rounds.search_overrides")


def run_rounds(cfg: MCTSConfig, run_dir: RunDir, problems: list[dict[str, Any]]) -> dict[str, Any]:
    policy, prm = cfg.model.path, cfg.prm
    rows: list[dict[str, Any]] = []
    r = cfg.rounds
    for k in range(1, r.count + 1):
        folder = run_dir.path / f"round_{k}"
        round_cfg = cfg if k == 1 else _with_overrides(cfg, r.search_overrides)
        done = RunDir(folder).completed_summary()
        summary = done or run_round(round_cfg, folder, policy=policy, prm=prm, label=f"round {k}",
                                    problems=problems if round_cfg.data == cfg.data else None)
        rows.append({"round": k, "policy": policy, "prm": prm, **{key: summary[key] for key in (
            "problems", "solved", "solve_rate", "correct", "accuracy", "mean_tree_size", "sft_rows", "ppm_pairs",
            "engine_calls", "seconds")}})
        if done is None:
            run_dir.log_metrics(rows[-1])
        log(f"round {k}: solve rate {summary['solve_rate']:.3f} ({summary['solved']}/{summary['problems']}), "
            f"{summary['sft_rows']} sft traces, {summary['ppm_pairs']} ppm pairs")
        atomic_write_text(run_dir.path / "rounds.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        if k == r.count:
            break
        if summary["sft_rows"] == 0:
            raise DataError(f"round {k} found no correct trace, so there is nothing to train the next policy on",
                            hint="raise search.iterations or search.n_generate_sample, or use easier problems")
        shared = {"data.prompt_template": cfg.data.prompt_template,
                  "model.chat_template": cfg.model.chat_template if cfg.model.chat_template != "tokenizer" else None}
        start = policy if r.sft_init == "previous" else r.base_model
        from mathctl.substeps import run_substep

        sft_summary = run_substep("sft", r.sft_recipe, r.sft_overrides, {
            "model.path": start, "data.source": str(folder / "sft.jsonl"), "data.prompt_field": "problem",
            "data.response_field": "response", **shared}, folder / "sft", rows=summary["sft_rows"])
        policy = sft_summary.get("final_dir") or str(folder / "sft" / "final")
        if summary["ppm_pairs"] == 0:
            log(f"round {k}: no PPM pairs; the next round keeps {'PPM ' + prm if prm else 'no PPM'}")
            continue
        rm_summary = run_substep("rm", r.rm_recipe, r.rm_overrides, {
            "model.path": policy, "data.source": str(folder / "ppm_pairs.jsonl"), **shared}, folder / "rm")
        prm = rm_summary.get("final_dir") or str(folder / "rm" / "final")
    from mathctl.plots import plot_rounds

    plot = plot_rounds(rows, run_dir.plots_dir / "solve_rate.png") if cfg.output.plots else None
    print_table(rounds_table(rows))
    final = rows[-1]
    return {"status": "completed", "rounds": rows, "solve_rate": final["solve_rate"], "accuracy": final["accuracy"],
            "policy": policy, "prm": prm, "plot": str(plot) if plot else None, "run_dir": str(run_dir.path)}


def rounds_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="mcts-sample rounds")
    for column in ("round", "solve rate", "accuracy", "mean tree", "sft traces", "ppm pairs", "engine calls", "seconds"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["round"]), f"{row['solve_rate']:.3f}", f"{row['accuracy']:.3f}",
                      f"{row['mean_tree_size']:.1f}", str(row["sft_rows"]), str(row["ppm_pairs"]),
                      str(row["engine_calls"]), f"{row['seconds']:.1f}")
    return table


# --- entry points ---------------------------------------------------------------------------------


def run(cfg: MCTSConfig, run_dir: RunDir) -> dict[str, Any]:
    """One round in the run folder itself, or `rounds.count` rounds in round_K/ folders."""
    from mathctl.models import resolve_model_path

    if cfg.launch.num_machines > 1:
        raise ConfigError(f"launch.num_machines={cfg.launch.num_machines}: mcts-sample searches one slice of the "
                          "problems per machine, started by the sbatch script", hint="add --slurm to write (and "
                          "--submit to submit) it, or run one --shard i/N per machine and `mathctl mcts-sample merge`")
    resolve_model_path(cfg.model.path)
    if cfg.prm:
        resolve_model_path(cfg.prm)
    problems = load_problems(cfg.data)  # once, before any model loads: bad data fails first
    from mathctl.replicas import check_layout

    check_layout(run_dir, cfg.replicas)
    if cfg.steps.kind == "code":  # before any model loads too: a machine that cannot isolate code fails first
        run_dir.update_meta(sandbox=check_sandbox(cfg.sandbox))
    run_dir.track(cfg.tracking, cfg.model_dump(mode="json"))
    if cfg.rounds.count > 1:
        summary = run_rounds(cfg, run_dir, problems)
    else:
        summary = run_round(cfg, run_dir.path, policy=cfg.model.path, prm=cfg.prm, problems=problems)
        print_table(rounds_table([{"round": 1, **summary}]))
        _log_round(run_dir, summary)
    summary["run_dir"] = str(run_dir.path)
    summary.setdefault("sandbox", run_dir.read_meta().get("sandbox"))
    run_dir.finish("completed", summary)
    return summary


def merge(folders: list[Path], out: Path) -> dict[str, Any]:
    """Combine the folders of `--shard i/N` runs into one (files concatenated, summary recomputed)."""
    from mathctl.core.io import iter_jsonl

    if not folders:
        raise ConfigError("mcts-sample merge needs the shard folders", hint="mathctl mcts-sample merge A B --run-dir OUT")
    modes = set()
    for folder in folders:
        if not (folder / "trees.jsonl").is_file():
            raise ConfigError(f"{folder} holds no trees.jsonl", hint="give the run folders of finished --shard runs")
        summary = RunDir(folder).completed_summary()
        if summary is None:
            raise ConfigError(f"{folder} is not a finished run", hint="finish it (--resume) before merging")
        modes.add(summary.get("mode"))
    if len(modes) > 1:
        raise ConfigError(f"the shards used different search modes ({', '.join(sorted(map(str, modes)))})",
                          hint="merge shards of one recipe")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty", hint="choose a new --run-dir for the merged folder")
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for name in FILES:
        lines = []
        for folder in folders:
            path = folder / name
            if not path.is_file():
                continue
            for _, row in iter_jsonl(path):
                if name == "trees.jsonl":
                    if row["id"] in seen:
                        raise ConfigError(f"problem {row['id']} is in more than one shard", hint="merge disjoint shards")
                    seen.add(row["id"])
                lines.append(json.dumps(row) + "\n")
        atomic_write_text(out / name, "".join(lines))
    summary = round_summary(out, modes.pop())
    summary["merged_from"] = [str(f) for f in folders]
    atomic_write_json(out / "summary.json", summary)
    return summary
