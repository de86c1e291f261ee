"""Stop strings: the one rule the engine, the server and streaming share.

Contract: a text stops at the EARLIEST occurrence of any of the stop strings (not at the stop
string listed first, nor at the one found last); the answer is the text before it.
"""

from __future__ import annotations

from collections.abc import Sequence


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def has_stop(text: str, stops: Sequence[str]) -> bool:
    return stop_index(text, stops) is not None


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its earliest stop string, and whether there was one."""
    at = stop_index(text, stops)
    return (text, False) if at is None else (text[:at], True)
