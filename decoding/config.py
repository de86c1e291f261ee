"""What a decoding call is asked for and what it gives back: settings, results, events.

- :class:`DecodingConfig`: validated search settings shared by the requests of one call.
- :class:`GenerationResult`: what one request produced (text, token ids, finish reason, token
  counts, the seed it ran with, logprobs when asked).
- :class:`TokenLogprob`: a chosen token's log-probability and its most likely alternatives.
- Events of a stream (``Engine.stream``): :class:`TokenEvent` as each token is chosen,
  :class:`DoneEvent` as each request finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veridical.errors import InputError

MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationResult:
    """What one request produced."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (on_token)
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token, with DecodingConfig.logprobs
    seed: int | None = None  # the seed the request ran with (decoding/seeds.py): replays it


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class DecodingConfig:
    """Validated search settings shared by the requests of one ``generate`` call."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k
    ignore_eos: bool = False  # EOS does not end a request (benchmarks: equal lengths)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> InputError:
            return InputError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not is_number(self.temperature) or not self.temperature > 0:
            raise bad("temperature", "a number > 0 (use do_sample=False for greedy decoding)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "0 < top_p <= 1")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables top-k)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise InputError(
                "beam sampling is not supported: use num_beams=1 with do_sample=True, "
                "or do_sample=False with num_beams > 1"
            )
        if not is_number(self.length_penalty):
            raise bad("length_penalty", "a number")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", "True, False or 'never'")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of them")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False")
        if self.ignore_eos and self.num_beams > 1:
            raise InputError("ignore_eos needs num_beams=1: beam search ends beams at EOS")
        if self.logprobs is not None:
            if not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise bad("logprobs", f"None, or an integer from 0 to {MAX_TOP_LOGPROBS}")
            if self.num_beams > 1:
                raise InputError("logprobs need greedy decoding or sampling (num_beams=1): "
                                 "beam search scores whole sequences, not tokens")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


@dataclass(frozen=True)
class TokenEvent:
    """Request ``request`` (its index in the call) chose ``token_id``; ``logprob`` is its
    :class:`TokenLogprob` with ``DecodingConfig.logprobs``, else None."""

    request: int
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class DoneEvent:
    """Request ``request`` finished with ``result``."""

    request: int
    result: GenerationResult


Event = TokenEvent | DoneEvent
