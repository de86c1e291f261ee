"""Token-by-token text for streamed answers, and OpenAI's ``logprobs`` shape.

Contract of :class:`TextStream`: fed the growing list of a request's token ids, it returns the
new text to send. The pieces never run past a stop string (the last ``max(len(stop)) - 1``
characters are held back until the next token shows they are not the start of one), never end in
whitespace or a half-decoded character (the final answer is stripped), and together with
``finish(final_text)`` they add up exactly to the final text ``Engine.run`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from veridical.decoding.engine import TokenLogprob
from veridical.decoding.stops import cut_at_stop

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a decoder shows for a character whose bytes are not all there yet


class TextStream:
    """See the module docstring."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.sent = ""

    def feed(self, token_ids: list[int]) -> str:
        text, stopped = cut_at_stop(self._decode(token_ids).lstrip(), self._stops)
        if not stopped and self._hold:
            text = text[: len(text) - self._hold]
        text = text.rstrip().rstrip(REPLACEMENT)
        return self._advance(text)

    def finish(self, final_text: str) -> str:
        piece = self._advance(final_text)
        if self.sent != final_text:  # the decoder rewrote earlier text: cannot be unsent
            logger.warning("streamed text %r is not a prefix of the answer %r", self.sent,
                           final_text)
        return piece

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def logprob_entries(entries: Sequence[TokenLogprob], token_text: Callable[[int], str],
                    top: int) -> list[dict[str, Any]]:
    """OpenAI's ``choices[].logprobs.content``: one entry per token, ``top`` alternatives."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, p) for t, p in e.top[:top]]}
            for e in entries]
