"""Stop strings: the one rule the engine, the server and streaming share.

Contract: a text stops at the EARLIEST occurrence of any of the stop strings (not at the stop
string listed first, nor at the one found last); the answer is the text before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


def finish_reason(token_ids: list[int], eos_ids: Sequence[int], tokenizer: Any,
                  config: Any) -> str | None:
    """Whether a sequence ended after its last token: ``"stop"`` (EOS, unless
    ``config.ignore_eos``, or a stop string in the text), ``"length"`` (``max_new_tokens``
    reached), or None. ``config`` is a ``DecodingConfig``."""
    if token_ids and token_ids[-1] in eos_ids and not config.ignore_eos:
        return "stop"
    if config.stop and has_stop(tokenizer.decode(token_ids, skip_special_tokens=True), config.stop):
        return "stop"
    if len(token_ids) >= config.max_new_tokens:
        return "length"
    return None


def final_text(tokenizer: Any, token_ids: list[int], stops: Sequence[str]) -> tuple[str, bool]:
    """A finished sequence's text (special tokens skipped, cut at its first stop string,
    stripped) and whether a stop string cut it."""
    text, stopped = cut_at_stop(tokenizer.decode(token_ids, skip_special_tokens=True), stops)
    return text.strip(), stopped
