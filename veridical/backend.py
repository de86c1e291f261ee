"""The backend seam: what the Python API, the server and the eval runner need of an engine.

Our own :class:`~veridical.decoding.engine.Engine` is one backend (``"transformers"``); the vLLM
backend (``veridical.vllm``, ``"vllm"``) is another; each offers the same interface, so neither the
server nor the runner knows which it has:

- ``backend`` (its name, recorded with evaluation results); ``name``; ``tokenizer`` (``decode`` for streamed text); ``eos_ids``; ``multimodal`` (whether it
  takes images); ``device`` (recorded with evaluation results);
- ``generate(images, prompts, method=..., ...)``: the batched call of the API;
- ``request(image, prompt, index)``: a checked :class:`~veridical.decoding.method.Request`;
- ``stream(requests, method, config, seeds, admit=None)``: an iterator of token and done events
  with ``cancel(i)``; ``run(...)``: the same, collected into results;
- ``unsupported(method)``: None when the backend runs the built method, else a one-line reason
  naming the backend that does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from veridical.decoding.config import DecodingConfig, Event, GenerationResult
from veridical.decoding.method import Method, Request


class EventStream(Protocol):
    def __iter__(self) -> Iterator[Event]: ...

    def cancel(self, request: int) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """See the module docstring."""

    backend: str
    name: str
    tokenizer: Any
    eos_ids: list[int]

    @property
    def multimodal(self) -> bool: ...

    @property
    def device(self) -> Any: ...

    def generate(self, images: Any, prompts: str | Sequence[str], method: str | Method = "none",
                 method_args: dict[str, Any] | None = None, **decoding: Any
                 ) -> GenerationResult | list[GenerationResult]: ...

    def request(self, image: Any, prompt: Any, index: int = 0) -> Request: ...

    def stream(self, requests: list[Request], method: Method, config: DecodingConfig,
               seeds: list[int | None], admit: Any = None) -> EventStream: ...

    def run(self, requests: list[Request], method: Method, config: DecodingConfig,
            seeds: list[int | None], on_token: Any = None, on_done: Any = None,
            admit: Any = None) -> list[GenerationResult]: ...

    def unsupported(self, method: Method) -> str | None: ...
