"""veridical: make vision-language models describe what is in the image.

Public API:
- ``load(ref, device=None, dtype=None) -> Engine``; ``Engine.generate(images, prompts, method=...)``
- ``methods()``: every registered mitigation method with its parameters and defaults.
"""

from .errors import InputError, UnsupportedModelError, VeridicalError
from .loading import load

__version__ = "0.1.0"


def methods() -> list[dict]:
    """Every registered method: name, description, parameters (default, type, range)."""
    from veridical.decoding.registry import methods as _methods

    return _methods()


__all__ = ["InputError", "UnsupportedModelError", "VeridicalError", "load", "methods", "__version__"]
