"""Recipes resolve by name from an installed wheel too, not only from a source checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_recipes_and_resolves_them_by_name(tmp_path):
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    subprocess.run(build, cwd=ROOT, check=True, capture_output=True)
    wheel = next(tmp_path.glob("sslvit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sslvit/recipes/mae_vit_b.py" in names and "sslvit/recipes/quickstart.py" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import sslvit, sys; from sslvit.recipe import load_recipe, list_recipes;"
        "import sslvit.cli, sslvit.data, sslvit.evaluation.cli, sslvit.train, sslvit.weights;"  # every subpackage ships
        "assert sslvit.__file__.startswith(sys.argv[1]), sslvit.__file__;"
        "print(load_recipe('mae_vit_l').model.name, 'quickstart' in list_recipes())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["vit_large_patch16_224", "True"]
