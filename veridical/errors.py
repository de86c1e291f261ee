"""Exceptions raised for bad input. Each message names the problem and the fix.

``InputError`` subclasses ``ValueError`` so that callers catching ``ValueError`` keep working.
"""


class VeridicalError(Exception):
    """Base class of the errors this package raises on purpose."""


class InputError(VeridicalError, ValueError):
    """A request, image, parameter or data file is malformed; the message says how to fix it."""


class UnsupportedModelError(VeridicalError, ValueError):
    """The model's architecture is not one the engine knows."""
