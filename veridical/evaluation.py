"""``veridical.evaluate(engine, EvalConfig(...))``: the benchmark runner, built-in data included.

The runner (``veridical.evals.runner``) reads question files, annotation folders and SynthCOCO
world folders; this entry point also takes ``data="builtin:synthcoco"``, the built-in world
(``veridical.world.builtin_world``: generated into the cache on first use, seconds), and hands
the runner its folder. The command line (``veridical eval``) and the demo come through here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from veridical.evals.runner import EvalConfig
from veridical.evals.runner import evaluate as run_evaluation
from veridical.world import resolve_data


def evaluate(engine: Any, config: EvalConfig, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) ``config`` on ``engine`` (None: load ``config.model``); the results."""
    data = resolve_data(config.data, config.world_split)
    return run_evaluation(engine, replace(config, data=data), quiet)
