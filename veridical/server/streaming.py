"""Token-by-token text for streamed answers, and OpenAI's ``logprobs`` shape.

Contract of :class:`TextStream`: fed the growing list of a request's token ids, it returns the
new text to send. The pieces never run past a stop string (the last ``max(len(stop)) - 1``
characters are held back until the next token shows they are not the start of one), never end in
whitespace or a half-decoded character (the final answer is stripped), and together with
``finish(final_text)`` they add up exactly to the final text ``Engine.run`` returns.

Contract of :func:`logprob_entries`: every number it returns is finite (JSON has no infinities).
A token that the method's scores rule out (the adaptive plausibility constraint, a banned EOS)
has log-probability -inf there: it cannot be chosen, and it is left out of ``top_logprobs``, so
that list may hold fewer than ``top_logprobs`` entries. A chosen token's own log-probability is
finite whenever the method's parameters are in range; should it not be, it is reported as
``UNLIKELY`` (-9999.0, the value OpenAI's API uses for a very unlikely token).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from veridical import TokenLogprob, cut_at_stop

logger = logging.getLogger(__name__)

UNLIKELY = -9999.0  # OpenAI's logprob for a very unlikely token; stands in for -inf or NaN

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
    """OpenAI's ``choices[].logprobs.content``: one entry per token, up to ``top`` alternatives
    that the scores allow (see the module docstring)."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    out = []
    for e in entries:
        chosen = e.logprob if math.isfinite(e.logprob) else UNLIKELY
        allowed = [one(t, p) for t, p in e.top[:top] if math.isfinite(p)]
        out.append({**one(e.token_id, chosen), "top_logprobs": allowed})
    return out
