"""The cache folder: ``$VERIDICAL_CACHE``, default ``~/.cache/veridical``.

It holds what veridical generates once and reuses: the built-in SynthCOCO world
(``veridical.world.builtin_world``) and head profiles keyed by model fingerprint
(``heads/`` under it, ``veridical.heads.default_cache_dir``). Everything in it can be deleted; it
is rebuilt on demand.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$VERIDICAL_CACHE``, else ``~/.cache/veridical`` (not created here)."""
    return Path(os.environ.get("VERIDICAL_CACHE", Path.home() / ".cache" / "veridical"))
