"""The steps (one module per subcommand) import the shared pieces below them, never each other: a change to
one step's internals cannot break another. The CLI and the worker sit above them and name them all;
`pipeline` and mcts-sample's rounds reach other steps only through `mathctl.worker.step_module`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mathctl"
STEPS = {"sft", "rm", "grpo", "dpo", "evaluate", "mcts_sample", "data", "pairs", "report", "pipeline", "convert",
         "decontaminate"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of mathctl modules that `path` (a module, or a package: all its files) imports, wherever the
    import statement sits."""
    names = set()
    files = sorted(path.glob("*.py")) if path.is_dir() else [path]
    for node in (n for f in files for n in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mathctl":
                names.update(alias.name for alias in node.names)
            elif node.module.startswith("mathctl."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mathctl."))
    return names


def test_steps_do_not_import_each_other():
    def step_path(step: str) -> Path:  # a step is mathctl/STEP.py, or a package mathctl/STEP/ once it outgrew one file
        return PACKAGE / step if (PACKAGE / step).is_dir() else PACKAGE / f"{step}.py"

    assert (PACKAGE / "grpo").is_dir()  # the package form is checked too
    crossings = {step: sorted(imported_modules(step_path(step)) & (STEPS - {step})) for step in sorted(STEPS)}
    assert {step: found for step, found in crossings.items() if found} == {}


def test_the_shared_modules_import_no_step():
    shared = [p for p in PACKAGE.glob("*.py") if p.stem not in STEPS | {"cli", "worker", "__main__"}]
    shared += list((PACKAGE / "core").glob("*.py")) + list((PACKAGE / "engines").glob("*.py"))
    shared += list((PACKAGE / "grading").glob("*.py"))
    crossings = {str(p.relative_to(PACKAGE)): sorted(imported_modules(p) & STEPS) for p in shared}
    assert {name: found for name, found in crossings.items() if found} == {}
