"""What produced a result: package versions and the git commit, recorded with every run,
profile and trained model (one home for this record; imports nothing of ours)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

RUN_PACKAGES = ("veridical", "torch", "transformers", "accelerate", "pycocotools", "nltk",
                "inflect", "datasets")


def versions(packages: tuple[str, ...] = RUN_PACKAGES, python: bool = True
             ) -> dict[str, str | None]:
    """``{"python": ..., package: version or None}`` for the installed ``packages``."""
    out: dict[str, str | None] = {"python": platform.python_version()} if python else {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """This checkout's commit (``+dirty`` with uncommitted changes to tracked files), or None
    outside a git checkout."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
