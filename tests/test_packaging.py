"""A non-editable install must contain every subpackage (pyproject lists them explicitly)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}, config["packages"]


def _expected_packages() -> set[str]:
    """Every folder with an __init__.py under a mapped folder, as a dotted package name."""
    dirs, _ = _package_dirs()
    return {
        ".".join((name, *init.parent.relative_to(folder).parts))
        for name, folder in dirs.items()
        for init in folder.rglob("__init__.py")
    }


def test_pyproject_lists_every_package():
    _, listed = _package_dirs()
    missing = _expected_packages() - set(listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("veridical-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in _expected_packages():
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"{init} missing from the wheel"
    assert "veridical/decoding/engine.py" in names
    assert "veridical/evals/chair_synonyms.txt" in names
    for shipped in (ROOT / "veridical" / "builtin").glob("*/*"):
        assert f"veridical/builtin/{shipped.parent.name}/{shipped.name}" in names
