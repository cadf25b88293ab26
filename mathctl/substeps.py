"""Running one step from inside another: mcts-sample's rounds train sft and rm between searches, and
`pipeline` runs each stage, each in its own run folder, through the same step modules the CLI uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mathctl.core.console import log
from mathctl.core.errors import DataError
from mathctl.core.rundir import RunDir


def run_substep(step: str, recipe: str, overrides: list[str], settings: dict[str, Any], folder: Path, *,
                rows: int | None = None) -> dict[str, Any]:
    """Run `mathctl STEP --recipe RECIPE OVERRIDES --run-dir FOLDER` in this process (or through its
    launcher), resuming an unfinished folder and skipping a finished one. `rows`: how many training
    rows the data holds (an sft round's traces), so that a round with fewer than one optimiser step
    needs trains on smaller micro-batches instead of stopping the rounds."""
    from mathctl.core import launch as launching
    from mathctl.core.config import dump_yaml, load_recipe
    from mathctl.worker import step_module

    done = RunDir(folder).completed_summary()
    if done is not None:
        log(f"{step}: {folder} is complete, skipped")
        return done
    module, config_cls = step_module(step)
    cfg, _ = load_recipe(step, config_cls, recipe, overrides, settings)
    if rows is not None:
        cfg = _fit_micro_batch(cfg, rows, step)
    resume = (folder / "recipe.yaml").is_file()
    run = RunDir.create(folder, recipe_yaml=dump_yaml(cfg), step=step, resume=resume, seeds=cfg.seeds())
    log(f"{step}: run folder {folder}" + (" (resumed)" if resume else ""))
    launch = getattr(cfg, "launch", None)  # `data pairs` has none: it runs here
    if launch is not None and launching.needs_launcher(launch) and not getattr(module, "PLACES_ITS_PROCESSES", False):
        code = launching.launch_local(cfg.launch, run.recipe_path, user_error=lambda: bool(run.read_meta().get("error")))
        if code != 0:
            raise DataError(f"the {step} run in {folder} failed (exit {code})",
                            hint="see its output above; fix it and rerun with --resume")
        return json.loads(run.summary_path.read_text())
    with run.failing():
        return module.run(cfg, run)


def _fit_micro_batch(cfg: Any, rows: int, step: str) -> Any:
    train_rows = rows - (getattr(cfg.data, "eval_rows", 0) or 0)
    per_micro_batch = cfg.train.grad_accum_steps * cfg.launch.num_processes
    size = cfg.train.micro_batch_size
    if train_rows >= size * per_micro_batch or train_rows < per_micro_batch:
        return cfg  # enough rows, or too few for any step (the step itself says so)
    fitted = train_rows // per_micro_batch
    log(f"{step}: {train_rows} training rows, fewer than one optimiser step of micro-batches of {size}: "
        f"train.micro_batch_size={fitted} for this round")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": fitted})})
