"""Run folders: the resolved recipe, the manifest, metrics and checkpoints of one run.

Layout (ARCHITECTURE.md):
    recipe.yaml         resolved recipe; the only input worker processes read
    meta.json           argv, versions, git revision, seeds, host, start/end, status
    metrics.jsonl       one JSON object per logged step (rank zero only)
    checkpoints/step_NNNNNN/   written under a temporary name, renamed when complete, COMPLETE marker
    final/              a Hugging Face folder
    plots/*.png
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mathctl import __version__
from mathctl.core.errors import CheckpointError, ConfigError
from mathctl.core.io import append_jsonl, atomic_write_json, atomic_write_text

COMPLETE_MARKER = "COMPLETE"
_LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "peft", "tokenizers", "safetensors", "vllm", "flash-attn")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "mathctl": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(path: Path) -> str | None:
    """The git commit of the checkout holding `path` (with `-dirty` when modified), if any."""
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# what a resumed run may change: where it runs and how a step's batch is split (trainers refuse a resume that
# would change the data order or the schedule: training.check_resume)
RESUME_MAY_CHANGE = ("launch.", "train.grad_accum_steps", "train.micro_batch_size", "train.grad_sync")


def _recipe_changes(saved: str, given: str) -> list[str]:
    """Dotted keys whose values differ between two recipe YAML texts."""
    import yaml

    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(data, dict):
            return {prefix.rstrip("."): data}
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out

    a, b = flat(yaml.safe_load(saved) or {}), flat(yaml.safe_load(given) or {})
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


class RunDir:
    """One run's folder. Create it with `create` (CLI) or `open` (workers)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.trackers = None  # mathctl.tracking.Trackers once `track` opened them

    # --- paths ---------------------------------------------------------------------------------
    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def recipe_backup_path(self) -> Path:
        return self.path / ".recipe.before-resume.yaml"

    def settle_recipe(self, ok: bool) -> None:
        """After a resume that changed the placement: keep the new recipe.yaml if the run went on (`ok`),
        else put the old one back."""
        if self.recipe_backup_path.is_file():
            if ok:
                self.recipe_backup_path.unlink()
            else:
                os.replace(self.recipe_backup_path, self.recipe_path)

    # --- creation ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, *, recipe_yaml: str, step: str, resume: bool,
               seeds: dict[str, int], argv: list[str] | None = None) -> RunDir:
        """Make (or, with `resume`, reopen) a run folder and write recipe.yaml and meta.json.

        Raises:
            ConfigError: the folder is not empty without --resume, is missing with --resume,
                cannot be written, or holds a different recipe than the one given on resume.
        """
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"run folder {run.path} is a file", hint="choose another --run-dir")
        if run.path.is_dir() and any(run.path.iterdir()) and not resume:
            raise ConfigError(f"run folder {run.path} is not empty",
                              hint="pass --resume to continue that run, or choose another --run-dir")
        if resume and not run.recipe_path.is_file():
            raise ConfigError(f"cannot resume: {run.path} holds no recipe.yaml",
                              hint="point --run-dir at the folder of an earlier run, or drop --resume")
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            probe = run.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write output folder {run.path}: {exc.strerror or exc}",
                              hint="choose a writable --run-dir (or output.root) and check its permissions") from None
        if resume:
            saved = run.recipe_path.read_text()
            if saved != recipe_yaml:
                changed = _recipe_changes(saved, recipe_yaml)
                if not all(key.startswith(RESUME_MAY_CHANGE) for key in changed):
                    raise ConfigError(
                        f"the recipe given differs from {run.recipe_path} in {', '.join(changed)}",
                        hint="resume with the same recipe and overrides, or just --resume --run-dir DIR; only "
                             f"{', '.join(RESUME_MAY_CHANGE)} may change on resume")
                # the placement changed (the step checks the rest); the old recipe comes back if this run fails
                shutil.copyfile(run.recipe_path, run.recipe_backup_path)
                atomic_write_text(run.recipe_path, recipe_yaml)
        else:
            atomic_write_text(run.recipe_path, recipe_yaml)
        meta = run.read_meta() if resume else {}
        meta.update({
            "step": step,
            "status": "running",
            "argv": argv if argv is not None else sys.argv,
            "versions": library_versions(),
            "git_revision": git_revision(Path(__file__).resolve().parent),
            "cwd_git_revision": git_revision(Path.cwd()),
            "host": socket.gethostname(),
            "seeds": seeds,
            "started": meta.get("started", now()),
            "resumed": (meta.get("resumed", []) + [now()]) if resume else [],
            "ended": None,
        })
        atomic_write_json(run.meta_path, meta)
        return run

    # --- meta and metrics ----------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            return {}
        return json.loads(self.meta_path.read_text())

    def update_meta(self, **fields: Any) -> None:
        meta = self.read_meta()
        meta.update(fields)
        atomic_write_json(self.meta_path, meta)

    def completed_summary(self) -> dict[str, Any] | None:
        """summary.json when the run finished (status completed), else None: what a re-run may skip."""
        if self.summary_path.is_file():
            summary = json.loads(self.summary_path.read_text())
            if summary.get("status") == "completed":
                return summary
        return None

    def finish(self, status: str, summary: dict[str, Any] | None = None) -> None:
        if summary is not None:
            atomic_write_json(self.summary_path, summary)
        self.update_meta(status=status, ended=now())
        self.close_trackers()

    # --- experiment trackers (mathctl/tracking.py) -----------------------------------------------
    def track(self, tracking: Any, config: dict[str, Any]) -> None:
        """Open the trackers of `tracking.report_to` (call on the main process only); from then on every
        `log_metrics` record goes to them too."""
        if not tracking.report_to or self.trackers is not None:
            return
        from mathctl.tracking import Trackers

        state = dict(self.read_meta().get("tracking") or {})
        self.trackers = Trackers(tracking, self.path, config, state)
        self.update_meta(tracking={"report_to": list(tracking.report_to), **state})

    def close_trackers(self) -> None:
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            trackers.close()

    @contextmanager
    def failing(self) -> Iterator[None]:
        """Mark the run failed in meta.json if the block raises (a user error also records its message)."""
        from mathctl.core.errors import MathctlError

        try:
            yield
        except MathctlError as exc:
            self.update_meta(status="failed", error=exc.message)
            self.close_trackers()
            raise
        except BaseException:
            self.update_meta(status="failed")
            self.close_trackers()
            raise

    def log_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)
        if self.trackers is not None:
            self.trackers.log(record)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is unreliable
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records logged after `after_step` (they belong to work a resume will redo)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob("step_*")
                 if p.is_dir() and (p / COMPLETE_MARKER).is_file() and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def begin_checkpoint(self, step: int) -> Path:
        """A fresh temporary folder for checkpoint `step`; `commit_checkpoint` renames it."""
        tmp = self.checkpoints_dir / f".tmp_step_{step:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int, keep_last: int | None = None) -> Path:
        (tmp / COMPLETE_MARKER).write_text(now() + "\n")
        final = self.checkpoint_path(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in self.complete_checkpoints()[:-keep_last]:
                (old / COMPLETE_MARKER).unlink(missing_ok=True)  # first: a half-deleted folder is never "complete"
                shutil.rmtree(old, ignore_errors=True)
        return final

    def require_checkpoint(self) -> Path:
        latest = self.latest_checkpoint()
        if latest is None:
            raise CheckpointError(f"no complete checkpoint under {self.checkpoints_dir}",
                                  hint="the run stopped before its first checkpoint; start it again without --resume")
        return latest
