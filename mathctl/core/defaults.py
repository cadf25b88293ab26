"""Project defaults: `mathctl.yaml` in the working directory, and the MATHCTL_MODEL variable.

A project that always evaluates or trains the same model keeps it in one place instead of on every command:

    # mathctl.yaml
    model: Qwen/Qwen2.5-Math-1.5B-Instruct   # steps whose recipe names no model (`mathctl eval aime2024`)
    data_dir: /data/benchmarks               # eval and mcts-sample benchmark copies (NAME/test.jsonl)
    output_root: /scratch/runs               # run folders go to OUTPUT_ROOT/STEP/NAME

They sit under every recipe: a recipe's own value, a flag or an override wins. MATHCTL_MODEL wins over the
file's `model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError

PROJECT_FILE = "mathctl.yaml"
MODEL_ENV = "MATHCTL_MODEL"
KEYS = ("model", "data_dir", "output_root")


def project_defaults(folder: Path | None = None) -> dict[str, str]:
    """The defaults in force here: `mathctl.yaml` of `folder` (the working directory), MATHCTL_MODEL over it.

    Raises:
        ConfigError: the file is not YAML, not a mapping, or has keys other than model, data_dir, output_root.
    """
    import yaml

    path = (folder or Path.cwd()) / PROJECT_FILE
    found: dict[str, str] = {}
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}",
                              hint="fix the file, or remove it") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a mapping of {', '.join(KEYS)}", hint="e.g. `model: Qwen/Qwen2.5-Math-7B`")
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ConfigError(f"{path} has unknown key(s) {', '.join(map(str, unknown))}",
                              hint=f"a project defaults file knows {', '.join(KEYS)}; recipe keys go in a recipe")
        found = {key: str(value) for key, value in data.items() if value is not None}
    if os.environ.get(MODEL_ENV):
        found["model"] = os.environ[MODEL_ENV]
    return found


def recipe_base(step: str, fields: set[str]) -> dict[str, Any]:
    """The project defaults as recipe data for `step` (whose config has the top-level `fields`), to lay under the
    recipe."""
    found = project_defaults()
    base: dict[str, Any] = {}
    if "model" in found and "model" in fields:
        base["model"] = {"path": found["model"]}
    if "output_root" in found and "output" in fields:
        base["output"] = {"root": found["output_root"]}
    if "data_dir" in found:
        section = {"eval": "eval", "mcts": "data"}.get(step)
        if section in fields:
            base[section] = {"data_dir": found["data_dir"]}
    return base
