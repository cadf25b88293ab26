"""The `mathctl` command line: one thin command per lifecycle step, and the single error boundary.

Exit codes (stable for scripts): 0 success; 1 a bug (traceback shown); 2 a user error (one `error:`
line and a `hint:` on stderr); 3 a gate not met. `--json` prints a machine-readable summary on
stdout; everything else goes to stderr. `MATHCTL_DEBUG=1` shows tracebacks for user errors too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import typer

from mathctl import __version__
from mathctl.benchmarks import BENCHMARKS
from mathctl.core.errors import EXIT_BUG, EXIT_OK, EXIT_USER, ConfigError, MathctlError
from mathctl.data import SOURCES as DATA_SOURCES

app = typer.Typer(
    name="mathctl",
    help="Math post-training lifecycle: data, sft, rm, dpo, grpo, mcts-sample, convert-ckpt, eval, grade, and the whole "
    "of it with pipeline. Start with: mathctl pipeline --recipe quickstart. Every command takes --help; "
    "shell completion: mathctl --install-completion.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

def _complete_recipe(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of --recipe: the shipped recipes of the command being typed."""
    from mathctl.core.config import available_recipes

    step = {"mcts-sample": "mcts", "prepare": "data"}.get(ctx.info_name or "", ctx.info_name or "")
    return [name for name in available_recipes(step) if name.startswith(incomplete)]


# Shared options (one definition, one help text).
RecipeOpt = typer.Option(None, "--recipe", "-r", help="Shipped recipe name or path to a YAML file.",
                         autocompletion=_complete_recipe)
OverridesArg = typer.Argument(None, help="Dotted overrides: train.lr=1e-5 launch.num_processes=2", show_default=False)
ModelOpt = typer.Option(None, "--model", "-m", help="Model hub id or folder; sets model.path.")
RunDirOpt = typer.Option(None, "--run-dir", help="Run folder (default: output.root/STEP/NAME-TIMESTAMP).")
ResumeOpt = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last complete checkpoint.")
DryRunOpt = typer.Option(False, "--dry-run", help="Validate, print the resolved recipe, and exit.")
JsonOpt = typer.Option(False, "--json", help="Print a JSON summary on stdout (logs stay on stderr).")
SlurmOpt = typer.Option(False, "--slurm", help="Write an sbatch script into the run folder instead of running.")
SubmitOpt = typer.Option(False, "--submit", help="With --slurm: submit the script with sbatch.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mathctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Math post-training lifecycle: data, sft, rm, dpo, grpo, mcts-sample, convert-ckpt, eval, pipeline, report."""


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def _saved_recipe(step: str, run_dir: Path | None, command: str | None = None) -> str:
    """`--resume --run-dir DIR` alone: the run's own resolved recipe."""
    if run_dir is None:
        raise ConfigError("--resume needs --run-dir", hint=f"mathctl {command or step} --resume --run-dir runs/{step}/NAME")
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise ConfigError(f"cannot resume: {run_dir} holds no recipe.yaml", hint="point --run-dir at an earlier run's folder")
    return str(saved)


def _write_sbatch(step: str, cfg: Any, run: Any, *, one_worker: bool, submit: bool, as_json: bool) -> None:
    """`--slurm`: the sbatch script into the run folder, submitted with `--submit`."""
    from mathctl.core import launch as launching
    from mathctl.core.console import log
    from mathctl.core.io import atomic_write_text

    script = run.path / "launch.sbatch"
    atomic_write_text(script, launching.render_slurm(step, cfg.launch, run.path, engine=getattr(cfg, "engine", None),
                                                     one_worker=one_worker))
    summary: dict[str, Any] = {"status": "written", "run_dir": str(run.path), "sbatch": str(script)}
    if submit:
        import subprocess

        try:
            out = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise ConfigError("sbatch is not on PATH", hint="run on a Slurm login node, or submit the script by hand") from None
        except subprocess.CalledProcessError as exc:
            raise ConfigError(f"sbatch failed: {exc.stderr.strip()}", hint="check the #SBATCH settings in launch.slurm") from None
        summary.update(status="submitted", sbatch_output=out.stdout.strip())
    log(f"sbatch script: {script}")
    _emit(summary, as_json)


def run_step(step: str, *, recipe: str | None, overrides: list[str] | None, aliases: dict[str, Any],
             run_dir: Path | None, resume: bool, dry_run: bool, as_json: bool, slurm: bool, submit: bool,
             command: str | None = None) -> None:
    """Shared flow of every training/search step: resolve, validate, make the run folder, run or launch."""
    from mathctl.core import launch as launching
    from mathctl.core.config import dump_yaml, load_recipe
    from mathctl.core.console import log
    from mathctl.core.rundir import RunDir
    from mathctl.worker import step_module

    module, config_cls = step_module(step)
    overrides = list(overrides or [])
    if resume and recipe is None and not overrides and all(v is None for v in aliases.values()):
        recipe = _saved_recipe(step, run_dir, command)
    if recipe is None:
        command = command or step
        raise ConfigError(f"mathctl {command} needs --recipe", hint=f"e.g. mathctl {command} --recipe quickstart-{step}; "
                          f"`mathctl {command} --help` lists the shipped recipes")
    cfg, name = load_recipe(step, config_cls, recipe, overrides, aliases)
    resolved = dump_yaml(cfg)
    if dry_run:
        from mathctl.core.console import warn
        from mathctl.memory_plan import plan_memory
        from mathctl.models import attention_plan

        attention = attention_plan(cfg)
        memory = plan_memory(step, cfg)
        if as_json:
            _emit({"status": "valid", "step": step, "recipe": cfg.model_dump(mode="json"),
                   **({"attention": attention} if attention else {}),
                   **({"memory": memory.summary()} if memory else {})}, True)
        else:
            sys.stdout.write(resolved)
            if attention:
                sys.stdout.write(f"# attention: {attention['cuda']} on a CUDA GPU, {attention['cpu']} on CPU\n")
            if memory:
                sys.stdout.write("".join(line + "\n" for line in memory.lines()))
        if memory and memory.warning():
            warn(memory.warning())
        return
    tracking = getattr(cfg, "tracking", None)
    if tracking is not None and not slurm:
        from mathctl.tracking import require

        require(tracking.report_to)  # a missing tracker fails before a run folder exists
    launch = getattr(cfg, "launch", None)
    if slurm and launch is None:
        raise ConfigError(f"mathctl {command or step} runs here, stage by stage; it has no --slurm",
                          hint="run it on a node with the resources its stages need, or pass --slurm to each step")
    if slurm and cfg.launch.num_processes == 1 and cfg.launch.num_machines == 1:
        log("note: --slurm with one process; the script starts a single worker")
    if run_dir is None:
        import datetime as _dt

        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.output.root) / step / (cfg.output.name or f"{name}-{stamp}")
    _quiet_libraries()
    model_spec = getattr(cfg, "model", None)
    if model_spec is not None and not slurm:
        from mathctl.models import resolve_model_path

        resolve_model_path(model_spec.path)  # a missing folder fails here, before a run folder exists
    run = RunDir.create(run_dir, recipe_yaml=resolved, step=step, resume=resume, seeds=cfg.seeds())
    log(f"run folder: {run.path}")
    if slurm:
        _write_sbatch(step, cfg, run, one_worker=getattr(module, "PLACES_ITS_PROCESSES", False), submit=submit,
                      as_json=as_json)
        return
    try:
        if launch is not None and launching.needs_launcher(launch) and not getattr(module, "PLACES_ITS_PROCESSES", False):
            code = launching.launch_local(cfg.launch, run.recipe_path,
                                          user_error=lambda: bool(run.read_meta().get("error")))
            meta = run.read_meta()
            if code != 0:
                if meta.get("status") == "running":
                    run.update_meta(status="failed")
                if meta.get("error"):
                    raise typer.Exit(EXIT_USER)  # the worker already printed its error line
                raise RuntimeError(f"workers exited with code {code}; see their output above")
            summary = json.loads(run.summary_path.read_text())
        else:
            with run.failing():
                summary = module.run(cfg, run)
    except BaseException:
        run.settle_recipe(ok=False)
        raise
    run.settle_recipe(ok=True)
    log(f"done: {summary.get('status')}; final model in {summary.get('final_dir', run.path)}")
    _emit(summary, as_json)


# --- steps ----------------------------------------------------------------------------------
def _recipes_help(step: str) -> str:
    from mathctl.core.config import available_recipes

    return ", ".join(available_recipes(step))


def _training_command(step: str, help_text: str) -> None:
    """Register `mathctl STEP`: the training steps (sft, rm, grpo, dpo) take the same options and share one flow."""

    def command(
        overrides: list[str] = OverridesArg,
        recipe: str = RecipeOpt,
        model: str = ModelOpt,
        run_dir: Path = RunDirOpt,
        resume: bool = ResumeOpt,
        dry_run: bool = DryRunOpt,
        json_out: bool = JsonOpt,
        slurm: bool = SlurmOpt,
        submit: bool = SubmitOpt,
    ) -> None:
        run_step(step, recipe=recipe, overrides=overrides, aliases={"model.path": model}, run_dir=run_dir,
                 resume=resume, dry_run=dry_run, as_json=json_out, slurm=slurm, submit=submit)

    command.__name__ = step
    app.command(step, help=help_text)(command)


_training_command("sft", "Supervised fine-tuning (full or LoRA), one process to many nodes. "
                  "Examples: mathctl sft --recipe quickstart-sft (tiny model, CPU, ~100 s); "
                  "mathctl sft --recipe openmath2 launch.num_processes=8; mathctl sft --resume --run-dir runs/sft/NAME. "
                  "Shipped recipes: " + _recipes_help("sft"))
_training_command("rm", "Reward models: outcome (Bradley-Terry on responses) or process (rStar-Math PPM on steps), "
                  "one process to many nodes. Examples: mathctl rm --recipe quickstart-ppm --model runs/sft/NAME/final; "
                  "mathctl rm --recipe rstar-ppm data.source=runs/mcts/NAME/ppm_pairs.jsonl. "
                  "Shipped recipes: " + _recipes_help("rm"))
_training_command("grpo", "GRPO with verifiable math rewards: rollouts on the engine (transformers; vLLM on GPU), "
                  "group-normalised advantages, clipped surrogate, optional KL to the reference; one process to many "
                  "nodes. Examples: mathctl grpo --recipe quickstart-grpo --model runs/sft/NAME/final; "
                  "mathctl grpo --recipe gsm8k-grpo-lora. Shipped recipes: " + _recipes_help("grpo"))
_training_command("dpo", "Direct preference optimisation on (prompt, chosen, rejected) pairs: DPO, length-normalised DPO "
                  "(dpo_norm, Tulu 3), IPO or SimPO, with a reference cached in the run folder or the LoRA base; one "
                  "process to many nodes. Examples: mathctl dpo --recipe quickstart-dpo --model runs/sft/quickstart/final "
                  "data.source=runs/pairs/quickstart/pairs.jsonl; mathctl dpo --recipe tulu3-dpo-8b launch.num_processes=8. "
                  "Pairs from a model's own graded answers: mathctl data pairs. Shipped recipes: " + _recipes_help("dpo"))


DEFAULT_MCTS_RECIPE = "rstar-math"  # `mathctl mcts-sample --rounds 4`: rStar-Math's search when no recipe is named


@app.command("mcts-sample", help="rStar-Math Monte Carlo Tree Search over code-augmented steps (or beam search, "
             "greedy), with a policy, an optional process preference model (--prm) and a sandbox for model-written "
             "code. Writes trees.jsonl, sft.jsonl, ppm_pairs.jsonl and summary.json. --rounds N runs self-evolution: "
             "search, train the next policy (sft) and PPM (rm) on the output, search again. "
             "`mathctl mcts-sample merge DIR... --run-dir OUT` combines --shard i/N runs. "
             "Example: mathctl mcts-sample --recipe quickstart-mcts --model runs/sft/quickstart-code/final --rounds 2. "
             "Without --recipe: rstar-math. Shipped recipes: " + _recipes_help("mcts"))
def mcts_sample(
    overrides: list[str] = typer.Argument(None, help="Dotted overrides (search.iterations=16), or `merge` followed "
                                          "by shard folders.", show_default=False),
    recipe: str = RecipeOpt,
    model: str = ModelOpt,
    prm: str = typer.Option(None, "--prm", help="Process preference model folder (a `mathctl rm` final/); sets prm."),
    rounds: int = typer.Option(None, "--rounds", min=1, help="Self-evolution rounds (rounds.count)."),
    shard: str = typer.Option(None, "--shard", help="i/N: search every N-th problem from i (data.shard)."),
    limit: int = typer.Option(None, "--limit", min=1, help="First N problems (data.limit)."),
    run_dir: Path = RunDirOpt,
    resume: bool = ResumeOpt,
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
    slurm: bool = SlurmOpt,
    submit: bool = SubmitOpt,
) -> None:
    overrides = list(overrides or [])
    if overrides[:1] == ["merge"]:
        from mathctl import mcts_sample as mcts

        if run_dir is None:
            raise ConfigError("mcts-sample merge needs --run-dir for the merged folder",
                              hint="mathctl mcts-sample merge runs/mcts/a-0 runs/mcts/a-1 --run-dir runs/mcts/a")
        summary = mcts.merge([Path(d) for d in overrides[1:]], run_dir)
        from mathctl.core.console import print_table

        print_table(mcts.rounds_table([{"round": 1, **summary}]))
        _emit(summary, json_out)
        return
    if recipe is None and not resume:
        recipe = DEFAULT_MCTS_RECIPE
        from mathctl.core.console import log

        log(f"recipe: {recipe} (the default of mcts-sample; --recipe picks another)")
    run_step("mcts", recipe=recipe, overrides=overrides, aliases={
        "model.path": model, "prm": prm, "rounds.count": rounds, "data.shard": shard, "data.limit": limit},
        run_dir=run_dir, resume=resume, dry_run=dry_run, as_json=json_out, slurm=slurm, submit=submit,
        command="mcts-sample")


@app.command("pipeline", help="Run several lifecycle steps in order, each in its own folder, and print a table of "
             "each stage's effect (accuracy, reward, solve rate) and where its artifacts are. A re-run skips finished "
             "stages. Example: mathctl pipeline --recipe quickstart (the whole lifecycle on a tiny model, CPU, minutes). "
             "Shipped recipes: " + _recipes_help("pipeline"))
def pipeline(
    overrides: list[str] = OverridesArg,
    recipe: str = RecipeOpt,
    run_dir: Path = RunDirOpt,
    resume: bool = ResumeOpt,
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
) -> None:
    if run_dir is None and recipe is not None:
        run_dir = Path("runs") / "pipeline" / Path(recipe).stem  # no timestamp: running it again continues it
    if run_dir is not None and (run_dir / "recipe.yaml").is_file() and not resume:
        resume = True  # a re-run into the same folder continues it: finished stages are skipped
    run_step("pipeline", recipe=recipe, overrides=overrides, aliases={}, run_dir=run_dir, resume=resume,
             dry_run=dry_run, as_json=json_out, slurm=False, submit=False)


@app.command("report", help="Write plots (loss, learning rate, grad norm, reward per function, KL, completion "
             "length, eval accuracy per task, per-round solve rate: whatever the run logged) and report.md with the "
             "run's config and summary into each run folder. A pipeline folder reports every stage. "
             "Example: mathctl report runs/grpo/NAME runs/eval/NAME")
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders (of any step, or a pipeline)."),
    json_out: bool = JsonOpt,
) -> None:
    from mathctl.core.console import log
    from mathctl.report import write_report

    _quiet_libraries()
    written = []
    for folder in run_dirs:
        for path in write_report(folder):
            log(f"report: {path}")
            written.append(str(path))
    _emit({"status": "completed", "reports": written}, json_out)


@app.command("tiny-model", help="Write a random-initialised tiny model and a locally trained tokenizer as a "
             "Hugging Face folder (for the quickstart and tests). Recipes can also say model.path=tiny:PRESET. "
             "Example: mathctl tiny-model runs/tiny --preset qwen2-small")
def tiny_model(
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty)."),
    preset: str = typer.Option("qwen2-tiny", "--preset", help="qwen2-tiny, llama-tiny, qwen2-small, llama-small, qwen2.5-0.5b"),
    seed: int = typer.Option(0, "--seed", help="Initialisation seed."),
    json_out: bool = JsonOpt,
) -> None:
    from mathctl.models import TINY_PRESETS, build_tiny_model

    if preset not in TINY_PRESETS:
        raise ConfigError(f"unknown tiny preset '{preset}'", hint=f"available: {', '.join(TINY_PRESETS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} is not empty", hint="choose a new folder")
    _quiet_libraries()
    try:
        path = build_tiny_model(out, preset, seed)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}", hint="choose a writable folder") from None
    from mathctl.core.console import log

    log(f"tiny model ({preset}) written to {path}")
    _emit({"status": "completed", "path": str(path), "preset": preset, "seed": seed}, json_out)


@data_app.command("synthetic", help="Write deterministic arithmetic word problems (problem, solution, answer) as JSONL. "
                  "Example: mathctl data synthetic runs/heldout.jsonl -n 200 --seed 1 --max-digits 1 --format code")
def data_synthetic(
    out: Path = typer.Argument(..., help="Output .jsonl file."),
    num_problems: int = typer.Option(1000, "--num-problems", "-n", min=1),
    seed: int = typer.Option(0, "--seed"),
    max_digits: int = typer.Option(2, "--max-digits", min=1, max=6),
    min_ops: int = typer.Option(1, "--min-ops", min=1),
    max_ops: int = typer.Option(2, "--max-ops", min=1),
    ops: str = typer.Option("+-", "--ops", help="Operations among + - *"),
    solution_format: str = typer.Option("text", "--format", help="Solutions as text sentences or as rStar-Math "
                                        "code-augmented steps (code)."),
    json_out: bool = JsonOpt,
) -> None:
    from mathctl.core.io import write_jsonl
    from mathctl.synthetic import SyntheticSpec, generate

    if min_ops > max_ops or not ops or set(ops) - set("+-*"):
        raise ConfigError("bad difficulty: need --min-ops <= --max-ops and --ops drawn from + - *",
                          hint="e.g. --min-ops 1 --max-ops 3 --ops '+-*'")
    if solution_format not in ("text", "code"):
        raise ConfigError(f"unknown --format {solution_format!r}", hint="use --format text or --format code")
    rows = generate(SyntheticSpec(num_problems=num_problems, seed=seed, max_digits=max_digits,
                                  min_ops=min_ops, max_ops=max_ops, ops=ops, format=solution_format))
    try:
        write_jsonl(out, rows)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}", hint="choose a writable path") from None
    _emit({"status": "completed", "path": str(out), "rows": len(rows)}, json_out)


@data_app.command("decontaminate", help="Drop training rows whose problem matches an eval test problem (exact, "
                  "normalized, or shared word n-grams); writes a filtered copy in the input's format (save_to_disk "
                  "folder, .jsonl or .parquet) and a decontamination.json report. "
                  "Example: mathctl data decontaminate runs/data/openmath2 --against math500,gsm8k")
def data_decontaminate(
    input_path: Path = typer.Argument(..., help="save_to_disk folder, .jsonl or .parquet file."),
    against: str = typer.Option(..., "--against", help="Comma-separated eval tasks, or `all`: "
                                + ", ".join(BENCHMARKS) + "."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Folder with NAME/test.jsonl (default: MATHCTL_DATA_DIR, "
                                  "else the hub)."),
    ngram: int = typer.Option(None, "--ngram", min=1, help="Words per n-gram [default: 8]."),
    min_overlap: float = typer.Option(None, "--min-overlap", min=0.0, max=1.0,
                                      help="Fraction of a test problem's n-grams a row must contain [default: 0.5]."),
    number_variants: bool = typer.Option(False, "--number-variants", help="Also flag n-gram matches whose test "
                                         "problem has numbers the row lacks (templated problems with other numbers)."),
    field_name: str = typer.Option(None, "--field", help="Field with the problem (default: problem, question, "
                                   "prompt or the first user message of messages)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output path (default: INPUT with a -decontaminated suffix)."),
    json_out: bool = JsonOpt,
) -> None:
    from mathctl import decontaminate as decon
    from mathctl.core.console import log

    if input_path.is_dir():
        _quiet_libraries()  # datasets reads and writes save_to_disk folders (jsonl and parquet need neither)
    summary = decon.decontaminate_file(
        input_path, against, out=out, data_dir=data_dir, field_name=field_name, same_numbers=not number_variants,
        n=decon.DEFAULT_NGRAM if ngram is None else ngram,
        min_overlap=decon.DEFAULT_MIN_OVERLAP if min_overlap is None else min_overlap)
    kinds = ", ".join(f"{kind} {count}" for kind, count in summary["by_kind"].items())
    tasks = ", ".join(f"{task} {count}" for task, count in summary["per_task"].items() if count) or "none"
    log(f"removed {summary['rows_removed']} of {summary['rows_in']} rows ({kinds}); by task: {tasks}")
    log(f"kept {summary['rows_kept']} rows -> {summary['output']} (report: {summary['report']}, "
        f"{summary['seconds']:.1f} s)")
    _emit(summary, json_out)


@data_app.command("pairs", help="Preference pairs for mathctl dpo from a model's own graded answers: n samples "
                  "per problem, graded against the gold, up to k (correct, incorrect) pairs per problem, seeded; "
                  "appended as it goes (--resume continues). Writes pairs.jsonl, samples.jsonl and summary.json. "
                  "Example: mathctl data pairs --recipe quickstart-pairs --model runs/sft/quickstart/final "
                  "--run-dir runs/pairs/quickstart. Shipped recipes: " + _recipes_help("pairs"))
def data_pairs(
    overrides: list[str] = OverridesArg,
    recipe: str = RecipeOpt,
    model: str = ModelOpt,
    n: int = typer.Option(None, "--n", min=2, help="Answers sampled per problem (sampling.n)."),
    k: int = typer.Option(None, "--k", min=1, help="Pairs per problem at most (pairs.max_per_problem)."),
    limit: int = typer.Option(None, "--limit", min=1, help="First N problems (data.limit)."),
    run_dir: Path = RunDirOpt,
    resume: bool = ResumeOpt,
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
) -> None:
    run_step("pairs", recipe=recipe, overrides=overrides, aliases={
        "model.path": model, "sampling.n": n, "pairs.max_per_problem": k, "data.limit": limit},
        run_dir=run_dir, resume=resume, dry_run=dry_run, as_json=json_out, slurm=False, submit=False,
        command="data pairs")


@data_app.command("prepare", help="Prepare SFT (tokenized, loss-masked, optionally packed) or RL (prompt + "
                  "gold answer) data from a source as a datasets folder with stats.json. Examples: mathctl data prepare "
                  "openmath2 --split train_1M --tokenizer Qwen/Qwen2.5-Math-1.5B --out runs/data/openmath2; mathctl data "
                  "prepare gsm8k --kind rl --out runs/data/gsm8k-rl. Sources: " + ", ".join(DATA_SOURCES))
def data_prepare(
    source: str = typer.Argument(None, help="Source name (sets `source`).", show_default=False),
    overrides: list[str] = OverridesArg,
    out: str = typer.Option(None, "--out", "-o", help="Output folder (sets `out`)."),
    input_path: str = typer.Option(None, "--input", help="Local file or folder instead of the hub id (sets `input`)."),
    kind: str = typer.Option(None, "--kind", help="sft or rl (sets `kind`)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer for sft, hub id, folder or tiny:PRESET (sets `tokenizer`)."),
    split: str = typer.Option(None, "--split", help="Hub split, e.g. train_1M for openmath2 (sets `split`)."),
    limit: int = typer.Option(None, "--limit", min=1, help="First N source rows (sets `limit`)."),
    num_proc: int = typer.Option(None, "--num-proc", min=1, help="Worker processes (sets `num_proc`)."),
    streaming: bool = typer.Option(None, "--streaming/--no-streaming", help="Read a hub source row by row (sets `streaming`)."),
    recipe: str = RecipeOpt,
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
) -> None:
    from mathctl.core.config import dump_yaml, load_recipe
    from mathctl.data import PrepareConfig, get_source, prepare

    overrides = list(overrides or [])
    if source is not None and "=" in source:
        overrides.insert(0, source)
        source = None
    if source is not None:
        get_source(source)  # an unknown source lists the known ones
    aliases = {"source": source, "out": out, "input": input_path, "kind": kind, "tokenizer": tokenizer,
               "split": split, "limit": limit, "num_proc": num_proc, "streaming": streaming}
    cfg, _ = load_recipe("data", PrepareConfig, recipe, overrides, aliases)
    if dry_run:
        sys.stdout.write(dump_yaml(cfg))
        return
    if cfg.streaming or not cfg.num_proc or cfg.num_proc == 1:
        # one process: the fast tokenizer may spread each batch over the cores (nothing forks later)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    _quiet_libraries()
    if not cfg.streaming and cfg.num_proc and cfg.num_proc > 1:
        import datasets

        datasets.enable_progress_bars()  # the workers' map progress (our bar covers in-process work)
    stats = prepare(cfg)
    stats.pop("config", None)
    _emit({"status": "completed", "out": cfg.out, **stats}, json_out)


@app.command("convert-ckpt", help="Convert checkpoints: DCP, FSDP run checkpoints, .pt state dicts and LoRA "
             "adapters to and from Hugging Face folders (sharded safetensors), verified after writing; GGUF files "
             "(llama.cpp) and verl/SkyRL FSDP actor checkpoints to Hugging Face folders; Instella's OLMo-style "
             "model.pt to and from Hugging Face Instella folders. Example: mathctl convert-ckpt "
             "runs/sft/NAME out/hf --dtype bf16")
def convert_ckpt(
    src: Path = typer.Argument(..., help="Checkpoint: HF folder, DCP folder, mathctl run or step folder, .pt file, "
                               "LoRA adapter folder, .gguf file, verl actor folder (global_step_N/actor) or Instella "
                               "checkpoint folder (model.pt + config.yaml)."),
    dst: Path = typer.Argument(None, help="Output folder (a new or empty one); not needed with --dry-run."),
    fmt_from: str = typer.Option(None, "--from", help="hf, dcp, fsdp (a mathctl run), torch (.pt), lora, gguf, "
                                 "verl (model_world_size_W_rank_R.pt files, also SkyRL) or olmo (alias instella: "
                                 "Instella's unsharded model.pt) [default: detected]."),
    fmt_to: str = typer.Option("hf", "--to", help="hf, dcp, torch, or olmo (alias instella: a Hugging Face Instella "
                               "model as Instella's model.pt + config.yaml)."),
    base_model: str = typer.Option(None, "--base-model", help="Hub id or folder with config.json and the tokenizer, "
                                   "when SRC lacks them (and the base of a LoRA adapter)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (as stored; float32 for a dequantised GGUF), bf16, fp16 "
                              "or fp32."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Write even if tensors the model has are "
                                       "missing from SRC (they are left out)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code from its "
                                           "folder or the hub (only to read its config)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List tensors, shapes, dtypes and the name mapping; write nothing."),
    json_out: bool = JsonOpt,
) -> None:
    from mathctl.convert import convert, iter_mapping_rows
    from mathctl.core.console import log, print_table

    _quiet_libraries()
    summary = convert(src, dst, fmt_from=fmt_from, fmt_to=fmt_to, base_model=base_model, dtype=dtype,
                      shard_size=shard_size, dry_run=dry_run, allow_missing=allow_missing,
                      trust_remote_code=trust_remote_code, progress_bar=not json_out)
    for note in summary["notes"]:
        log(note)
    if dry_run:
        if not json_out and "gguf" in summary:
            from rich.table import Table

            gguf = summary["gguf"]
            table = Table(title=f"{gguf['file']}: architecture {gguf['architecture']}, {len(gguf['tensors'])} tensors")
            for column in ("tensor", "shape", "type"):
                table.add_column(column)
            for row in gguf["tensors"]:
                table.add_row(row["name"], "x".join(map(str, row["shape"])), row["type"])
            print_table(table)
            log(f"writes {summary['tensors']} Hugging Face tensors ({summary['bytes'] / 1e9:.3f} GB); "
                f"tied: {', '.join(summary['tied']) or 'none'}")
        elif not json_out:
            from rich.table import Table

            table = Table(title=f"{summary['from']} -> {summary['to']}: {summary['tensors']} tensors, "
                                f"{summary['bytes'] / 1e9:.3f} GB")
            for column in ("source", "target", "shape", "dtype"):
                table.add_column(column)
            for row in iter_mapping_rows(summary):
                table.add_row(*row)
            print_table(table)
            for label in ("missing", "unexpected", "mismatched", "dropped", "tied", "lora_merged"):
                if summary[label]:
                    log(f"{label}: {', '.join(summary[label][:8])}" + (" ..." if len(summary[label]) > 8 else ""))
        _emit(summary, json_out)
        return
    log(f"wrote {summary['written_tensors']} tensors, {summary['written_bytes'] / 1e9:.3f} GB in "
        f"{len(summary['files'])} files to {summary['output']} ({summary['seconds']} s, verified)")
    _emit(summary, json_out)


@app.command(help="Grade model responses in a JSONL file against gold answers; prints the accuracy. "
             "Example: mathctl grade runs/outputs.jsonl --response-field completion --answer-field gold --out graded.jsonl")
def grade(
    file: Path = typer.Argument(..., help="JSONL file, one object per line with a response and a gold answer."),
    response_field: str = typer.Option("response", "--response-field", help="Field holding the model's response."),
    answer_field: str = typer.Option("answer", "--answer-field", help="Field holding the gold answer (string, number or list)."),
    out: Path = typer.Option(None, "--out", help="Write each row plus `correct`, `extracted` and `reason` here."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Also write graded.jsonl and summary.json into this folder."),
    timeout_s: float = typer.Option(1.0, "--timeout", min=0.01, help="Time limit of each symbolic check, seconds."),
    workers: int = typer.Option(None, "--workers", min=0, help="Processes for symbolic checks (default: all cores)."),
    json_out: bool = JsonOpt,
) -> None:
    from mathctl.core.errors import DataError
    from mathctl.core.io import atomic_write_json, iter_jsonl, write_jsonl
    from mathctl.grading import grade_batch

    rows, responses, golds = [], [], []
    for number, row in iter_jsonl(file):
        for field in (response_field, answer_field):
            if field not in row:
                raise DataError(f"{file} line {number}: no field '{field}' (fields: {', '.join(sorted(row)) or 'none'})",
                                hint="name the fields with --response-field / --answer-field")
        rows.append(row)
        responses.append(str(row[response_field]) if row[response_field] is not None else "")
        golds.append(row[answer_field])
    grades = grade_batch(responses, golds, timeout_s=timeout_s, workers=workers)
    correct = sum(g.correct for g in grades)
    summary = {"total": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0}
    graded = [dict(row, correct=g.correct, extracted=g.extracted, reason=g.reason) for row, g in zip(rows, grades)]
    try:
        if out is not None:
            write_jsonl(out, graded)
        if run_dir is not None:
            write_jsonl(run_dir / "graded.jsonl", graded)
            atomic_write_json(run_dir / "summary.json", summary)
    except OSError as exc:
        raise ConfigError(f"cannot write {exc.filename}: {exc.strerror}", hint="choose a writable --out / --run-dir") from None
    from mathctl.core.console import log

    log(f"accuracy {summary['accuracy']:.4f} ({correct}/{len(rows)})")
    _emit(summary, json_out)


@app.command("eval", help="Evaluate a model on math benchmarks: mathctl eval math500,aime2024 --model PATH. "
             "Writes results.jsonl (appended as it goes; --resume skips finished problems) and summary.json. "
             "`mathctl eval merge DIR... --run-dir OUT` combines the runs of --shard i/N. "
             "`mathctl eval processbench --prm PATH` judges a process reward model instead: the earliest wrong "
             "step of ProcessBench's solutions (F1 per split; no --model). "
             "Tasks: " + ", ".join(BENCHMARKS)
             + ". Shipped recipes: " + _recipes_help("eval"))
def eval_cmd(
    tasks: str = typer.Argument(None, help="Comma-separated tasks (sets eval.tasks), or `merge` followed by shard folders.",
                                show_default=False),
    overrides: list[str] = OverridesArg,
    recipe: str = RecipeOpt,
    model: str = ModelOpt,
    n: int = typer.Option(None, "--n", min=1, help="Samples per problem (eval.n)."),
    temperature: float = typer.Option(None, "--temperature", min=0, help="Sampling temperature (eval.temperature)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (eval.top_p)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Tokens per sample (eval.max_new_tokens)."),
    limit: int = typer.Option(None, "--limit", min=1, help="First N problems of each task (eval.limit)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Local benchmark folder, NAME/test.jsonl (eval.data_dir; "
                                 "default $MATHCTL_DATA_DIR, else the hub)."),
    shard: str = typer.Option(None, "--shard", help="i/N: evaluate every N-th problem from i (eval.shard)."),
    min_score: float = typer.Option(None, "--min-score", help="Exit 3 if a task scores below this (eval.min_score)."),
    backend: str = typer.Option(None, "--backend", help="auto, hf or vllm (engine.backend)."),
    prm: str = typer.Option(None, "--prm", help="Reward model folder (a `mathctl rm` final/): scores every sample, "
                            "adds bon@k (eval.prm; eval.prm_aggregate=last|min); with processbench, the model judged."),
    threshold: float = typer.Option(None, "--threshold", help="processbench: a step scoring below this is an error "
                                    "(eval.processbench.threshold; default: chosen on a calibration part)."),
    run_dir: Path = RunDirOpt,
    resume: bool = ResumeOpt,
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
    slurm: bool = SlurmOpt,
    submit: bool = SubmitOpt,
) -> None:
    from mathctl import evaluate
    from mathctl.core.config import dump_yaml, load_recipe
    from mathctl.core.console import log, print_table
    from mathctl.core.rundir import RunDir

    overrides = list(overrides or [])
    if tasks is not None and "=" in tasks:  # `mathctl eval --recipe R key=value`: no task argument
        overrides.insert(0, tasks)
        tasks = None
    if tasks == "merge":
        if run_dir is None:
            raise ConfigError("eval merge needs --run-dir for the merged results",
                              hint="mathctl eval merge runs/eval/a-0 runs/eval/a-1 --run-dir runs/eval/a")
        summary = evaluate.merge([Path(d) for d in overrides], run_dir, min_score=min_score)
        print_table(evaluate.render_table(summary))
        _emit(summary, json_out)
        evaluate.check_gate(summary)
        return
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    aliases = {"model.path": model, "eval.tasks": task_list, "eval.n": n, "eval.temperature": temperature,
               "eval.top_p": top_p, "eval.max_new_tokens": max_new_tokens, "eval.limit": limit,
               "eval.data_dir": data_dir, "eval.shard": shard, "eval.min_score": min_score, "engine.backend": backend,
               "eval.prm": prm, "eval.processbench.threshold": threshold}
    if resume and recipe is None and not overrides and all(v is None for v in aliases.values()):
        recipe = _saved_recipe("eval", run_dir)
    named_processbench = any(t.lower() == evaluate.PROCESSBENCH for t in task_list or [])
    if named_processbench and model is not None:
        raise ConfigError("processbench judges the reward model given with --prm on ProcessBench's own solutions; "
                          "it uses no --model", hint="mathctl eval processbench --prm runs/rm/NAME/final")
    if (recipe is None and model is None and not named_processbench
            and not any(o.startswith("model.path=") for o in overrides)):
        from mathctl.core.defaults import MODEL_ENV, PROJECT_FILE, project_defaults

        if "model" not in project_defaults():
            raise ConfigError("mathctl eval needs a model", hint=f"mathctl eval math500 --model PATH_OR_HUB_ID (or "
                              f"tiny:qwen2-tiny), or set {MODEL_ENV}, or `model: ...` in ./{PROJECT_FILE}")
    cfg, name = load_recipe("eval", evaluate.EvalConfig, recipe, overrides, aliases)
    if dry_run:
        if json_out:
            _emit({"status": "valid", "step": "eval", "recipe": cfg.model_dump(mode="json")}, True)
        else:
            sys.stdout.write(dump_yaml(cfg))
        return
    if cfg.launch.num_machines > 1 and not slurm:
        raise ConfigError(f"launch.num_machines={cfg.launch.num_machines}: eval answers one slice of the problems per "
                          "machine, started by an sbatch script", hint="add --slurm to write (and --submit to submit) "
                          "it, or run one --shard i/N per machine and `mathctl eval merge` them")
    _quiet_libraries()
    judging_prm = evaluate.is_processbench(cfg)
    if not slurm:  # the script runs where the model and data are; nothing here needs to reach them
        from mathctl.models import resolve_model_path

        if not judging_prm:
            resolve_model_path(cfg.model.path)
        if cfg.eval.prm:
            resolve_model_path(cfg.eval.prm)  # a missing reward model fails before a run folder exists
        problems = evaluate.load_tasks(cfg)  # unknown files fail here, before a run folder exists
        from mathctl.tracking import require

        require(cfg.tracking.report_to)
    if run_dir is None:
        import datetime as _dt
        import re as _re

        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if judging_prm:  # runs/rm/NAME/final -> processbench-NAME
            prm_path = Path(cfg.eval.prm.rstrip("/"))
            label = "processbench-" + (prm_path.parent.name if prm_path.name == "final" else prm_path.name)
        else:
            label = cfg.model.path
        label = _re.sub(r"[^A-Za-z0-9._-]+", "-", Path(label.rstrip("/")).name or label).strip("-")
        run_dir = Path(cfg.output.root) / "eval" / (cfg.output.name or f"{label}-{stamp}")
    run = RunDir.create(run_dir, recipe_yaml=dump_yaml(cfg), step="eval", resume=resume, seeds=cfg.seeds())
    log(f"run folder: {run.path}")
    if slurm:
        _write_sbatch("eval", cfg, run, one_worker=True, submit=submit, as_json=json_out)
        return
    with run.failing():
        summary = evaluate.run(cfg, run, problems=problems)
    print_table(evaluate.render_table(summary))
    _emit(summary, json_out)
    evaluate.check_gate(summary)


# --- entry point ----------------------------------------------------------------------------
try:  # typer >= 0.29 raises the exceptions of its bundled copy of click, not the installed click's
    from typer._click import exceptions as _bundled
except ImportError:  # pragma: no cover - older typer uses click itself
    _bundled = click.exceptions
_EXITS = tuple({click.exceptions.Exit, typer.Exit, getattr(_bundled, "Exit", typer.Exit)})
_CLICK_ERRORS = tuple({click.ClickException, _bundled.ClickException})
_ABORTS = tuple({click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort),
                 getattr(_bundled, "Abort", click.exceptions.Abort)})


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    from mathctl.core.console import console

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args, prog_name="mathctl", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK  # click returns Exit codes in this mode
    except MathctlError as exc:
        if os.environ.get("MATHCTL_DEBUG") == "1":
            console.print_exception(show_locals=False)
        from rich.text import Text

        console.print(Text("error: ", style="red") + Text(exc.message))
        if exc.hint:
            console.print(Text(f"hint: {exc.hint}"))
        return exc.exit_code
    except _EXITS as exc:
        return exc.exit_code
    except _CLICK_ERRORS as exc:  # usage errors: unknown option, a value out of range, a missing argument
        from rich.text import Text

        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None and ctx.command_path else "mathctl"
        console.print(Text("error: ", style="red") + Text(" ".join(exc.format_message().split())))
        console.print(Text(f"hint: `{where} --help` lists its options and arguments"))
        return EXIT_USER
    except _ABORTS:
        console.print("aborted")
        return 130
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception:
        console.print_exception(show_locals=False)
        return EXIT_BUG


if __name__ == "__main__":
    raise SystemExit(main())
