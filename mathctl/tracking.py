"""Experiment tracking: the records a run appends to metrics.jsonl, also sent to tensorboard, wandb, trackio
or mlflow (`tracking.report_to`), with the run's name and resolved config attached.

`RunDir.track(cfg.tracking, config)` opens the trackers on the main process at the start of a step;
`RunDir.log_metrics` then sends every record to them as it writes it, and `RunDir.finish` (or a failure)
closes them. A record's numbers become scalars: nested dicts flatten with `/` (`pass@k/4`), an eval record's
`task` prefixes its keys (`gsm8k/score`), and its `step` (or `round`) is the x axis. Strings, lists and
non-finite numbers are left to metrics.jsonl.

Each tracker is an optional dependency, imported only when asked for; a missing one is a user error before
anything runs. Resuming a run continues the same wandb and mlflow runs (their ids are kept in meta.json).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow-skinny sqlalchemy alembic")}
_AXES = ("step", "round")


def require(report_to: list[str]) -> None:
    """Every asked-for tracker imports.

    Raises:
        ConfigError: one that is not installed (the package to install named).
    """
    import importlib.util

    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        packages = " ".join(PACKAGES[name][1] for name in missing)
        raise ConfigError(f"tracking.report_to asks for {', '.join(missing)}, which is not installed",
                          hint=f"pip install {packages} (tensorboard and wandb: pip install 'mathctl[tracking]'), "
                               "or drop it from tracking.report_to")


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(x-axis step, {name: value}) of one metrics record."""
    step = next((int(record[axis]) for axis in _AXES if isinstance(record.get(axis), (int, float))), None)
    prefix = f"{record['task']}/" if isinstance(record.get("task"), str) else ""
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[prefix + key] = float(value)
        elif isinstance(value, dict):
            for sub, inner in value.items():
                add(f"{key}/{sub}", inner)

    for key, value in record.items():
        if key not in _AXES and key != "task":
            add(key, value)
    return step, out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 1e-5, ...}: the nested config as dotted keys (mlflow's params)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


class _TensorBoard:
    def __init__(self, run_path: Path, name: str, config: dict[str, Any], state: dict[str, Any]):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)  # markdown code block

    def log(self, step: int | None, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class _Wandb:
    def __init__(self, run_path: Path, name: str, config: dict[str, Any], state: dict[str, Any], *, project: str,
                 mode: str):
        import wandb

        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_path), mode=mode,
                              id=state.get("wandb_id"), resume="allow")
        state["wandb_id"] = self.run.id
        self.mode = mode

    def log(self, step: int | None, values: dict[str, float]) -> None:
        self.run.log(values, **({"step": step} if step is not None else {}))

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, run_path: Path, name: str, config: dict[str, Any], state: dict[str, Any], *, project: str):
        import trackio

        self.module = trackio
        self.run = trackio.init(project=project, name=name, config=config, resume="allow")

    def log(self, step: int | None, values: dict[str, float]) -> None:
        self.module.log(values, step=step)

    def close(self) -> None:
        self.module.finish()


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class _Mlflow:
    def __init__(self, run_path: Path, name: str, config: dict[str, Any], state: dict[str, Any], *, project: str):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server named: a SQLite store in the run folder
            mlflow.set_tracking_uri(f"sqlite:///{(run_path / 'mlflow.db').resolve()}")
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_id=state.get("mlflow_run_id"), run_name=None if state.get("mlflow_run_id")
                                    else name)
        state["mlflow_run_id"] = self.run.info.run_id
        if not state.get("mlflow_params"):
            params = {self.key(k): str(v)[:500] for k, v in flat_config(config).items()}
            mlflow.log_params(params)
            state["mlflow_params"] = True

    @staticmethod
    def key(name: str) -> str:
        return _MLFLOW_KEY.sub("_", name)  # mlflow refuses e.g. `@` in names: pass@k/4 -> pass_k/4

    def log(self, step: int | None, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({self.key(k): v for k, v in values.items()}, step=step or 0)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackers:
    """The open trackers of one run; `state` (ids to resume with) is kept in meta.json by RunDir."""

    def __init__(self, tracking, run_path: Path, config: dict[str, Any], state: dict[str, Any]):
        require(tracking.report_to)
        name = tracking.run_name or run_path.resolve().name
        self.state = state
        self.open: dict[str, Any] = {}
        try:
            for kind in tracking.report_to:
                if kind == "tensorboard":
                    self.open[kind] = _TensorBoard(run_path, name, config, state)
                elif kind == "wandb":
                    self.open[kind] = _Wandb(run_path, name, config, state, project=tracking.project,
                                             mode=tracking.wandb_mode)
                elif kind == "trackio":
                    self.open[kind] = _Trackio(run_path, name, config, state, project=tracking.project)
                elif kind == "mlflow":
                    self.open[kind] = _Mlflow(run_path, name, config, state, project=tracking.project)
        except Exception:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        if values:
            for tracker in self.open.values():
                tracker.log(step, values)

    def close(self) -> None:
        while self.open:
            _, tracker = self.open.popitem()
            tracker.close()
