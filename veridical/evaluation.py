"""``veridical.evaluate(engine, EvalConfig(...))``: the benchmark runner, built-in data included.

The runner (``veridical.evals.runner``) reads question files, annotation folders and SynthCOCO
world folders; this entry point also takes ``data="builtin:synthcoco"``, the built-in world
(``veridical.world.builtin_world``: generated into the cache on first use, seconds), and hands
the runner its folder. The command line (``veridical eval``) and the demo come through here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from veridical.errors import InputError
from veridical.evals.runner import EvalConfig
from veridical.evals.runner import evaluate as run_evaluation

BUILTIN_DATA = "builtin:synthcoco"


def resolve_builtin(config: EvalConfig) -> EvalConfig:
    """``config`` with ``builtin:synthcoco`` replaced by the built-in world's folder."""
    if config.data == BUILTIN_DATA:
        from veridical.world import builtin_world

        return replace(config, data=str(builtin_world(config.world_split)))
    if config.data.startswith("builtin:"):
        raise InputError(f"unknown built-in data {config.data!r}; the built-in data set is "
                         f"{BUILTIN_DATA}")
    return config


def evaluate(engine: Any, config: EvalConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) ``config`` on ``engine`` (None: load ``config.model``); the results."""
    return run_evaluation(engine, resolve_builtin(config), quiet)
