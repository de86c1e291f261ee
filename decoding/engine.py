"""The batched decoding engine.

Contract: ``Engine.generate`` runs many requests, and every extra branch a method asks for, in ONE
batched forward per step. A request's output never depends on what else is in the batch: rows are
left-padded with attention masks and position ids (Qwen's multimodal rope included) computed the
way ``model.generate`` computes them, each row has its own KV cache entry, sampling draws from a
per-request ``torch.Generator``, and finished requests leave the batch. Everything random about
a request derives from its seed alone (decoding/seeds.py); a request given no seed gets a fresh
one, reported as ``GenerationResult.seed``. Greedy decoding equals
``model.generate(do_sample=False)`` token for token and beam search equals transformers' beam
search (same candidate selection, length penalty and early-stopping heuristic).

Where the parts live: settings, results and events in ``config.py``; the batch state (cache rows
and everything kept per row) in ``state.py``; what methods see of the engine in ``context.py``;
the searches in ``greedy.py`` (greedy decoding and sampling), ``beam.py`` and ``opera.py``.

Streaming: ``stream(requests, method, config, seeds, admit=None)`` is an iterator of events, a
:class:`~.config.TokenEvent` as each token is chosen (greedy and sampling; beam search and search
methods such as OPERA know their tokens only at the end, and send them then) and a
:class:`~.config.DoneEvent` with the request's :class:`~.config.GenerationResult` as soon as it
is known, while the rest of the batch decodes on. ``stream.cancel(i)`` while request ``i``'s
token event is out ends it at once (finish reason ``"cancelled"``). ``DecodingConfig(logprobs=k)``
records, per chosen token, its log-probability and the ``k`` most likely tokens' under the scores
the token was chosen from (the method's adjusted scores, before temperature and top-p).
``run(...)`` consumes the stream and returns the results; its callbacks ``on_token(i, token,
logprob)`` (returning False cancels) and ``on_done(i, result)`` see the events as they come.

The context: every request (given or joining) must fit the model's context, its prompt tokens
(image tokens included) plus the tokens it may generate at most ``max_position_embeddings`` of
the model's text config (unchecked where the config has none); the rows of its branches too.
Otherwise the call raises an ``InputError`` naming the counts and the fix before any forward.
A request may carry its own, lower limit (``Request.max_new_tokens``): greedy decoding and
sampling end its row there (finish reason ``"length"``), and the context check uses it; beam
search and search methods decode every request to the call's ``max_new_tokens``.

Joining a running batch (continuous batching; greedy decoding and sampling): ``admit=h`` is called
as ``h(n_live)`` before each decode step, and with ``n_live = 0`` once every row has finished (the
stream ends when that brings nothing); it returns new ``(Request, seed)`` pairs (or nothing) that
join the batch at once: their rows are prefilled in one forward of their own, left-padded to the
batch's length (or the batch to theirs) and merged, and from then on they share every step. Their
indices continue after the requests given. A joined request gives the tokens it gives alone: its
rows, masks, positions and per-row state are its own, and a method's per-step rule sees the
request's own step. Beam search, search methods, caches other than transformers' plain
``DynamicCache``, and methods that both install hooks and prepare per-request state with forwards
of their own take no newcomers (``h`` is not called).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from veridical.errors import InputError
from veridical.images import load_image

from .attention import restore, use_edits
from .beam import beam_search
from .config import DecodingConfig, DoneEvent, Event, GenerationResult, TokenEvent, is_int
from .context import MethodContext
from .greedy import Finished, decode
from .method import Method, Request, RowInfo
from .registry import resolve
from .seeds import branch_key, derive_seed, fresh_seed, request_seeds
from .state import BatchState
from .stops import final_text

logger = logging.getLogger(__name__)

# (live requests) -> new (request, seed) pairs that join the running batch
AdmitCallback = Callable[[int], "Sequence[tuple[Request, int | None]]"]


class Engine:
    """A model, its processor and its architecture adapter, with the batched ``generate``."""

    backend = "transformers"  # the Backend seam's name for this engine (veridical.vllm: "vllm")

    def __init__(self, model: torch.nn.Module, processor: Any, adapter: Any, name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Edited attention: "auto" = the fused Triton kernel on CUDA, the torch route on CPU
        # (with VAR's numba loops, veridical.kernels.cpu); "triton" / "torch" force one.
        self.attention_impl = "auto"
        self.head_profile: dict | None = None  # the model's head profile (veridical.heads)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        gen = getattr(model, "generation_config", None)
        self.eos_ids = eos_token_ids(gen, self.tokenizer)
        pad = getattr(gen, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def multimodal(self) -> bool:
        """Whether the model takes images."""
        return bool(self.adapter.multimodal)

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (``max_position_embeddings`` of its text config), or
        None where its config names none."""
        return model_context(self.model)

    def check_context(self, prompt_tokens: int, image_tokens: int, max_new_tokens: int,
                      name: str = "max_new_tokens") -> None:
        """Raise an ``InputError`` when a prompt of ``prompt_tokens`` (``image_tokens`` of them
        for the image) plus ``max_new_tokens`` does not fit the model's context; ``name`` is
        what the caller calls the limit (the server: ``max_tokens``)."""
        check_context(prompt_tokens, image_tokens, max_new_tokens, self.context_length, name)

    def unsupported(self, method: Method) -> str | None:
        """None: this engine runs every registered method (the backend seam's question)."""
        return None

    def context(self) -> MethodContext:
        """What methods see of this engine (decoding/context.py)."""
        return MethodContext(self.model, self.processor, self.adapter, self.name, self.eos_ids,
                             self.pad_id, self.head_profile, self.attention_impl)

    # Public API ---------------------------------------------------------------------------------
    def generate(
        self,
        images: Any,
        prompts: str | Sequence[str],
        method: str | Method = "none",
        method_args: dict[str, Any] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        seed: int | Sequence[int | None] | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one request (``prompts`` a string) or a batch (a list of strings).

        ``images`` is a PIL image, a path or None per request (a single value for one request).
        ``seed`` is one integer for every request or one per request; ``None`` (or a None
        entry) draws a fresh seed, returned as ``result.seed`` (decoding/seeds.py).
        ``logprobs=k`` adds each token's log-probability and its top ``k`` alternatives (module
        docstring). ``ignore_eos=True`` decodes every request to ``max_new_tokens`` (EOS does
        not end it; greedy decoding and sampling), as speed benchmarks need. Returns one
        :class:`GenerationResult` per request.
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if single:
            image_list = [images]
        elif images is None:
            image_list = [None] * len(prompt_list)
        elif isinstance(images, (list, tuple)):
            image_list = list(images)
        else:
            raise InputError("prompts is a list, so images must be a list too (one per prompt)")
        if len(image_list) != len(prompt_list):
            raise InputError(
                f"got {len(image_list)} images for {len(prompt_list)} prompts; give one image "
                "(or None) per prompt"
            )
        if not prompt_list:
            return []
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        config = DecodingConfig(
            max_new_tokens, do_sample, temperature, top_p, top_k, num_beams, length_penalty,
            early_stopping, stops, logprobs, ignore_eos,
        )
        requests = [self.request(img, p, i) for i, (img, p) in enumerate(zip(image_list, prompt_list))]
        seeds = request_seeds(seed, len(requests))
        results = self.run(requests, resolve(method, method_args), config, seeds)
        return results[0] if single else results

    def request(self, image: Any, prompt: Any, index: int = 0) -> Request:
        """A validated request for :meth:`run`: the prompt checked, the image (PIL image or
        path) loaded; ``index`` names the request in error messages."""
        where = f"request {index}"
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: the prompt is empty; give the user's question as text")
        if image is not None:
            if not self.adapter.multimodal:
                raise InputError(
                    f"{where}: model {self.name!r} is text-only and cannot take an image; "
                    "pass image=None or load a vision-language model"
                )
            image = load_image(image)
        return Request(image=image, prompt=prompt)

    def run(
        self,
        requests: list[Request],
        method: Method,
        config: DecodingConfig,
        seeds: list[int | None],
        on_token: Callable[[int, int, Any], bool] | None = None,
        on_done: Callable[[int, GenerationResult], None] | None = None,
        admit: AdmitCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode validated requests with a built method, one seed per request (None: a fresh
        one); the results in request order (joined requests after the given ones). The
        callbacks see :meth:`stream`'s events: ``on_token(i, token_id, logprob)`` returning
        False cancels request ``i``; ``on_done(i, result)``."""
        stream = self.stream(requests, method, config, seeds, admit)
        results: dict[int, GenerationResult] = {}
        for event in stream:
            if isinstance(event, TokenEvent):
                if on_token is not None and not on_token(event.request, event.token_id,
                                                         event.logprob):
                    stream.cancel(event.request)
            else:
                results[event.request] = event.result
                if on_done is not None:
                    on_done(event.request, event.result)
        return [results[i] for i in range(len(results))]

    def stream(self, requests: list[Request], method: Method, config: DecodingConfig,
               seeds: list[int | None], admit: AdmitCallback | None = None) -> TokenStream:
        """The events of decoding ``requests`` (module docstring)."""
        return TokenStream(self, requests, method, config, seeds, admit)

    # For methods, searches and the logits-processor adapter ------------------------------------
    def branch_rows(self, requests: list[Request], branches: list, seeds: list[int]
                    ) -> list[dict[str, torch.Tensor]]:
        """Encoded rows of every branch (branch-major), each built with its own generator,
        seeded from its request's seed and the branch's own name (decoding/seeds.py)."""
        ctx = self.context()
        rows = []
        for branch in branches:
            key = branch_key(branch.name)
            for request, seed in zip(requests, seeds):
                rng = torch.Generator().manual_seed(derive_seed(seed, "branch", key))
                row = ctx.encode(branch.make(request, rng))
                if branch.on_pixels is not None and "pixel_values" in row:
                    row["pixel_values"] = branch.on_pixels(row["pixel_values"], rng)
                rows.append(row)
        return rows

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Left-padded batch on the model's device, pixels in the model's dtype."""
        return self.context().collate(rows)


class EventStream:
    """The events of one decoding call; iterate it once. ``cancel(i)`` ends request ``i`` at
    its current token; ``close()`` stops early. ``events(cancelled)`` makes the events' iterator,
    reading the set of cancelled requests as it goes (any backend's decoding loop)."""

    def __init__(self, events: Callable[[set[int]], Iterator[Event]]) -> None:
        self.cancelled: set[int] = set()
        self._events = events(self.cancelled)

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def __next__(self) -> Event:
        return next(self._events)

    def cancel(self, request: int) -> None:
        self.cancelled.add(request)

    def close(self) -> None:
        """Stop early: the method's hooks are removed at once."""
        self._events.close()


class TokenStream(EventStream):
    """``Engine.stream``'s events (see :class:`EventStream`)."""

    def __init__(self, engine: Engine, requests: list[Request], method: Method,
                 config: DecodingConfig, seeds: list[int | None],
                 admit: AdmitCallback | None = None) -> None:
        custom = method.search()
        if config.logprobs is not None and custom is not None:
            raise InputError(f"logprobs are not available with {method.name!r}: its search "
                             "chooses whole sequences; leave logprobs unset")
        if config.ignore_eos and custom is not None:
            raise InputError(f"ignore_eos is not available with {method.name!r}: its search "
                             "ends beams at EOS; leave ignore_eos unset")
        given = [fresh_seed() if s is None else s for s in seeds]
        super().__init__(lambda cancelled: _events(engine, requests, method, config, given,
                                                   admit, cancelled))


def _events(engine: Engine, requests: list[Request], method: Method, config: DecodingConfig,
            seeds: list[int], admit: AdmitCallback | None, cancelled: set[int]
            ) -> Iterator[Event]:
    ctx = engine.context()
    ctx.cancelled = cancelled
    custom = method.search()
    branches = method.branches()
    n_branches = len(branches) + 1
    info = RowInfo(["main"] + [b.name for b in branches], n_slots=len(requests))
    edits = method.attention_edits(ctx)
    image_id = engine.adapter.image_token_id(engine.model.config)
    context = model_context(engine.model)
    whole_batch = custom is not None or config.num_beams > 1  # no per-request limits
    prompt_tokens: list[int] = []
    image_tokens: list[int] = []
    limits: list[int] = []  # each request's own max_new_tokens
    emitted: list[int] = []  # tokens each request has chosen so far
    ended_at_limit: set[int] = set()  # requests whose own limit ended them

    def counts(row: dict[str, torch.Tensor]) -> tuple[int, int]:
        images = int((row["input_ids"] == image_id).sum()) if image_id is not None else 0
        return int(row["attention_mask"].sum()), images

    def start(new: list[Request], new_seeds: list[int]) -> BatchState:
        """The rows of ``new`` (and of their branches), checked against the context,
        collated, ready to prefill."""
        first = len(prompt_tokens)  # the index of new[0]
        for i, request in enumerate(new, first):
            limits.append(request_limit(request, config, whole_batch, i))
        main = [ctx.encode(r) for r in new]
        for i, row in enumerate(main, first):
            check_context(*counts(row), limits[i], context, where=f"request {i}: ")
        extra = engine.branch_rows(new, branches, new_seeds)
        for j, row in enumerate(extra):  # branch-major
            i, branch = first + j % len(new), branches[j // len(new)]
            check_context(*counts(row), limits[i], context,
                          where=f"request {i} ({branch.name} branch): ")
        rows = main + extra
        prompt_tokens.extend(counts(r)[0] for r in main)
        image_tokens.extend(counts(r)[1] for r in main)
        emitted.extend(0 for _ in new)
        row_data = {k: v.repeat(n_branches, *([1] * (v.dim() - 1)))  # every block
                    for k, v in method.prepare(ctx, new).items()}
        info.n_slots = len(new)  # the hooks see the rows being prefilled
        return BatchState(engine.model, ctx.collate(rows), engine.cache_kw, info, image_id,
                          edits, row_data, engine.attention_impl)

    def join(n_live: int) -> tuple[BatchState, list[int]] | None:
        new = list(admit(n_live)) if admit is not None else []
        if not new:
            return None
        new_seeds = [fresh_seed() if sd is None else sd for _, sd in new]
        seeds.extend(new_seeds)
        return start([r for r, _ in new], new_seeds), new_seeds

    def result(finished: Finished) -> DoneEvent:
        i = finished.request
        text, stopped = final_text(engine.tokenizer, finished.token_ids, config.stop)
        reason = finished.reason
        if reason == "cancelled" and i in ended_at_limit:
            reason = "length"
        return DoneEvent(i, GenerationResult(
            text, finished.token_ids, "stop" if stopped else reason,
            prompt_tokens[i], len(finished.token_ids), image_tokens[i], finished.logprobs,
            seeds[i]))

    state = start(requests, seeds)
    handles = method.install(ctx, info)
    previous = use_edits(engine.model, engine.adapter.multimodal) if edits else None
    # a newcomer's own forwards (prepare) would run under another request's hooks
    joinable = admit is not None and not (handles and _prepares(method))
    try:
        if custom is None and config.num_beams == 1:
            for event in decode(ctx, state, method, n_branches, config, seeds,
                                join if joinable else None, cancelled):
                if isinstance(event, Finished):
                    yield result(event)
                    continue
                i = event.request
                emitted[i] += 1
                if limits[i] < config.max_new_tokens and emitted[i] >= limits[i]:
                    ended_at_limit.add(i)  # its own limit: the row ends here
                    cancelled.add(i)
                yield event
            return
        search = custom or beam_search
        outputs = search(ctx, state, method, n_branches, config, seeds)
    finally:
        for handle in handles:
            handle.remove()
        if previous is not None:
            restore(engine.model, previous)
    # these searches know their tokens only now
    for request, (ids, _) in enumerate(outputs):
        for token in ids:
            yield TokenEvent(request, token)
    for request, (ids, reason) in enumerate(outputs):
        yield result(Finished(request, ids, reason))


def model_context(model: torch.nn.Module) -> int | None:
    """``max_position_embeddings`` of the model's text config; None where it has none."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text, "max_position_embeddings", None)
    return length if is_int(length) and length > 0 else None


def check_context(prompt_tokens: int, image_tokens: int, max_new_tokens: int,
                  context: int | None, name: str = "max_new_tokens", where: str = "") -> None:
    """Raise an ``InputError`` when ``prompt_tokens`` (``image_tokens`` of them for the image)
    plus ``max_new_tokens`` (the caller's ``name`` for it) exceed ``context`` (None: unknown,
    unchecked); ``where`` prefixes the message (``"request 3: "``)."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    what = (f"{prompt_tokens} prompt tokens"
            + (f" ({image_tokens} of them for the image)" if image_tokens else ""))
    raise InputError(f"{where}this model's context is {context} tokens, but the request needs "
                     f"{prompt_tokens + max_new_tokens}: {what} + {name} {max_new_tokens}; "
                     f"lower {name} or shorten the prompt")


def request_limit(request: Request, config: DecodingConfig, whole_batch: bool, index: int
                  ) -> int:
    """The tokens request ``index`` may generate: its own ``max_new_tokens`` below the call's,
    except where the search decodes the whole batch to the call's limit (``whole_batch``)."""
    own = request.max_new_tokens
    if own is None:
        return config.max_new_tokens
    if not is_int(own) or own < 1:
        raise InputError(f"request {index}: max_new_tokens={own!r} is invalid; give an integer "
                         ">= 1, or None for the call's limit")
    return config.max_new_tokens if whole_batch else min(own, config.max_new_tokens)


def eos_token_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """The ids that end a sequence: the generation config's ``eos_token_id`` (one or a list;
    the config may be None) and the tokenizer's, sorted, without repeats."""
    eos = [getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id]
    return sorted({int(i) for e in eos if e is not None for i in _as_list(e)})


def _as_list(x: Any) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


def _prepares(method: Method) -> bool:
    """Whether ``method`` (or a part of it) overrides ``Method.prepare``."""
    parts = getattr(method, "parts", None)  # a composite's
    if parts:
        return any(_prepares(part) for part in parts)
    return type(method).prepare is not Method.prepare
