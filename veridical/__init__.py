"""veridical: make vision-language models describe what is in the image.

The public API (what users, the server and the eval runner import):
- ``load(ref, device=None, dtype=None, head_profile=None) -> Engine``; ``Engine.generate(images,
  prompts, method=..., ...)``, ``Engine.stream(...)`` (token and done events), ``Engine.run``;
- ``DecodingConfig``, ``Request``, ``GenerationResult``, ``TokenLogprob``, ``TokenEvent``,
  ``DoneEvent``: settings, requests, results and stream events;
- ``methods()``: every registered mitigation with its parameters and defaults;
  ``resolve(name, args)``: a built method (``"vhr+vcd"``, with did-you-mean errors);
- ``derive_seed(seed, *key)`` / ``fresh_seed()``: where a request's randomness comes from;
- ``Backend``: the interface an engine offers (ours, or another backend's);
- ``evaluate(engine, EvalConfig(...))``: run and score POPE, CHAIR or MME;
- the errors ``VeridicalError``, ``InputError``, ``UnsupportedModelError``.

Names are imported on first use, so ``import veridical`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import InputError, UnsupportedModelError, VeridicalError

__version__ = "0.1.0"

_LAZY = {
    "load": "veridical.loading",
    "Engine": "veridical.decoding.engine",
    "DecodingConfig": "veridical.decoding.config",
    "GenerationResult": "veridical.decoding.config",
    "TokenLogprob": "veridical.decoding.config",
    "TokenEvent": "veridical.decoding.config",
    "DoneEvent": "veridical.decoding.config",
    "MAX_TOP_LOGPROBS": "veridical.decoding.config",
    "Request": "veridical.decoding.method",
    "resolve": "veridical.decoding.registry",
    "parse_method_sets": "veridical.decoding.registry",
    "derive_seed": "veridical.decoding.seeds",
    "fresh_seed": "veridical.decoding.seeds",
    "cut_at_stop": "veridical.decoding.stops",
    "Backend": "veridical.backend",
    "evaluate": "veridical.evaluation",
    "EvalConfig": "veridical.evals.runner",
}


def methods() -> list[dict]:
    """Every registered method: name, description, parameters (default, type, range)."""
    from veridical.decoding.registry import methods as registered

    return registered()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'veridical' has no attribute {name!r}")


__all__ = ["InputError", "UnsupportedModelError", "VeridicalError", "methods", "__version__",
           *_LAZY]
