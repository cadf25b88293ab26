"""The wheel ships the recipes, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_recipes_and_console_script(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mathctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("mathctl/recipes/")}
    on_disk = {p.name for p in (REPO / "mathctl" / "recipes").rglob("*.yaml")}
    assert on_disk and on_disk <= shipped
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mathctl = mathctl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text()
    assert any(c.endswith("mathctl pipeline --recipe quickstart") for c in commands)  # the quickstart one-liner
