"""What a chat request's text becomes for the model: special tokens neutralised, tokens counted,
the context checked.

- Client text is text. The engine builds the prompt with the processor's chat template, a
  string the tokenizer then reads, and a tokenizer turns any special-token string it meets in
  that string (``</s>``, ``<s>``, ``<|im_start|>``, ``<image>``, ...) into the special token
  itself: a user could close their own turn and write a system or assistant turn. So every
  special or added token's string found in the system and user text gets a ZERO WIDTH SPACE
  (U+200B) after its first character (``</s>`` -> ``<\\u200b/s>``): the model reads ordinary
  text tokens there, and the template's own special tokens are untouched. The residual risk:
  chat templates whose role markers are plain text rather than special tokens (Llama-2's
  ``[INST]``, LLaVA-1.5's ``USER:`` / ``ASSISTANT:``) tokenize the same from the template as
  from the user, so a user can still write text that looks like a turn boundary there; no
  escaping at the text level can prevent that, only encoding the user's text separately.
- :class:`PromptCounter` counts a request's prompt tokens (image tokens included) with the
  engine's own encoding (its method context's ``encode``) on a private copy of the processor (a
  tokenizer is not safe to share with the engine thread), off the event loop; it also knows the
  model's context length and image processor. A backend that offers no method context (not our
  ``Engine``) is not counted: the checks are skipped, the engine's own limits apply.
- :meth:`PromptCounter.fit` applies the engine's context rule (``Engine.check_context``: prompt
  tokens, image tokens included, plus ``max_tokens`` within the model's context) before the
  request is queued, so the client gets a 400 ``context_length_exceeded`` (as OpenAI's servers
  answer) rather than an error from a running batch; a request that names no ``max_tokens``
  gets the default cut to the room left. The engine checks again when the request starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import threading
from typing import Any

from veridical import Request
from veridical.errors import InputError

logger = logging.getLogger(__name__)

ZERO_WIDTH_SPACE = "\u200b"


class SpecialTokens:
    """Neutralises the tokenizer's special and added token strings in client text."""

    def __init__(self, tokenizer: Any) -> None:
        strings = set(getattr(tokenizer, "all_special_tokens", None) or [])
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            strings.add(getattr(token, "content", str(token)))
        strings = sorted((s for s in strings if len(s) > 1), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, strings))) if strings else None

    def neutralise(self, text: str | None) -> str | None:
        if text is None or self.pattern is None:
            return text
        return self.pattern.sub(lambda m: m[0][0] + ZERO_WIDTH_SPACE + m[0][1:], text)


class PromptCounter:
    """Prompt tokens of a request as the engine will encode it (module docstring)."""

    def __init__(self, engine: Any) -> None:
        make = getattr(engine, "context", None)
        self.ctx = make() if callable(make) else None
        self.context_length: int | None = None  # the model's, None if unknown
        self.check_context = getattr(engine, "check_context", None)  # the engine's rule
        self.image_processor: Any = None
        self.image_token_id: int | None = None
        self._lock = threading.Lock()
        if self.ctx is None:
            return
        try:
            self.ctx = dataclasses.replace(self.ctx, processor=copy.deepcopy(self.ctx.processor))
        except Exception:  # not copyable: share the engine's (our lock still serialises ours)
            logger.warning("the processor cannot be copied; counting prompts with the engine's")
        config = self.ctx.model.config
        self.context_length = getattr(engine, "context_length", None)
        self.image_processor = getattr(self.ctx.processor, "image_processor", None)
        self.image_token_id = self.ctx.adapter.image_token_id(config)

    def count(self, image: Any, prompt: str, system: str | None) -> tuple[int, int] | None:
        """(prompt tokens, image tokens among them), or None when the backend cannot say.
        CPU-bound: call it from a worker thread."""
        if self.ctx is None:
            return None
        with self._lock:
            row = self.ctx.encode(Request(image=image, prompt=prompt, system=system))
        ids = row["input_ids"]
        images = int((ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        return int(row["attention_mask"].sum()), images

    def fit(self, prompt_tokens: int, image_tokens: int, max_tokens: int | None,
            default_max_tokens: int, name: str = "max_tokens") -> int:
        """The number of tokens a request may generate: ``max_tokens`` when the engine's
        context check passes (module docstring), or without ``max_tokens`` the default cut to
        the room the prompt leaves; an ``InputError`` naming the counts otherwise."""
        context = self.context_length
        if max_tokens is None:
            if context is None:
                return default_max_tokens
            if prompt_tokens >= context:
                of_image = f" ({image_tokens} of them for the image)" if image_tokens else ""
                raise InputError(f"this model's context is {context} tokens, and the prompt "
                                 f"alone has {prompt_tokens} tokens{of_image}; shorten the "
                                 "messages")
            return min(default_max_tokens, context - prompt_tokens)
        if self.check_context is not None:
            self.check_context(prompt_tokens, image_tokens, max_tokens, name)
        return max_tokens
