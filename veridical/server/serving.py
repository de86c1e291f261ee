"""Chat completions: an OpenAI request -> a validated engine job -> an OpenAI response.

What ``POST /v1/chat/completions`` accepts (everything else is refused with a 400 naming the
field and the limit, before any engine work):
- ``messages``: any system/developer messages (text only, joined with blank lines into the one
  system message), then exactly ONE user message: its text parts joined with newlines, and at most
  one ``image_url`` part (the engine decodes one image and one user turn; the image is placed
  before the text, as the model's chat template does). Multi-turn history, assistant and tool
  messages are refused rather than silently flattened.
- ``model`` must be the served name (404 otherwise, as OpenAI answers an unknown model).
- Decoding: ``temperature`` (0, or below 1e-5, = greedy; default from ``--temperature``, 1.0
  as OpenAI),
  ``top_p``, ``seed`` (absent: a fresh one; the seed used is answered in the ``seed`` field of
  the response and of every stream chunk, so the request can be replayed), ``stop`` (up to 4
  strings; the answer ends at the earliest), ``max_completion_tokens``/``max_tokens``
  (up to ``--max-tokens-limit``; the prompt's tokens, image tokens included, at most
  ``--max-prompt-tokens``, and prompt + max_tokens within the model's context, see ``prompt``;
  without one, the default is cut to the room left), ``n = 1``, ``logprobs`` with
  ``top_logprobs`` (0-20): the log-probabilities of the scores each token was chosen from, i.e.
  after the mitigation and before temperature and top-p, tokens the scores rule out left out
  (see ``streaming.logprob_entries``; refused for search methods such as OPERA, which choose
  whole sequences).
- ``mitigation``: ``{"method": M, ...params}`` validated against the registry (an unknown method
  or parameter is a 400 naming it and the allowed values); ``{"alpha": 2}`` without ``method``
  adjusts the start-up default; no ``mitigation`` uses the start-up default.

Results equal ``Engine.generate`` for the same image, text, method and settings: the job goes to
``Engine.run`` through the batcher. Requests with the same :class:`BatchKey` share one engine call;
``max_tokens`` is not part of the key: each request leaves the batch at its own limit (the
engine's ``on_token`` callback), which gives the tokens a separate call would (decoding is
batch-invariant and the stop tests look only at a request's own tokens). Continuous batching
(greedy decoding and sampling): a request that arrives while a batch with its key runs joins it
at the next step (the engine's ``admit``), up to ``--max-batch-size`` rows; and each request is
answered as soon as its own row finishes (the engine's ``on_done``), not when the batch ends.

Streaming sends the role chunk at once, then the text as the tokens are chosen (one
``chat.completion.chunk`` per token that adds text, see :class:`~.streaming.TextStream`; beam
search and OPERA know their tokens only at the end), the finish reason, the usage chunk when
``stream_options.include_usage``, and ``data: [DONE]``. A client that disconnects is cancelled:
dropped from the queue if it waits, or its row leaves the running batch at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from veridical import (
    MAX_TOP_LOGPROBS,
    DecodingConfig,
    GenerationResult,
    InputError,
    Request,
    TokenEvent,
    TokenLogprob,
    VeridicalError,
    cut_at_stop,
    fresh_seed,
    resolve,
)

from .batcher import Batcher, Job, QueueFull, ShuttingDown
from .errors import ApiError, bad_request, clip, shorten
from .media import decode_image, fetch_image_bytes
from .prompt import PromptCounter, SpecialTokens
from .protocol import ChatCompletionRequest, ChatMessage, ImagePart, Mitigation
from .settings import ServerSettings
from .streaming import TextStream, logprob_entries

logger = logging.getLogger(__name__)

MAX_STOP = 4
SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (as vLLM)


@dataclass(frozen=True)
class BatchKey:
    """Settings that requests must share to run in one engine call."""

    method: str
    method_args: tuple[tuple[str, Any], ...]
    do_sample: bool
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    logprobs: bool = False  # the jobs ask for logprobs (each its own number of alternatives)


@dataclass
class EngineJob:
    request: Request
    seed: int  # the request's seed, or a fresh one (answered back to the client)
    max_tokens: int
    logprobs: int | None = None  # None: off; k: top-k alternatives per token
    # Set by the event loop, read by the engine thread:
    on_token: Callable[[int, TokenLogprob | None], None] | None = None  # streaming
    cancelled: bool = False  # the client went away: the row leaves the batch
    sent: int = 0  # tokens already given to on_token (a batch retried alone skips them)
    # Set by the engine thread while the job runs: ends its row (searches see it between steps)
    cancel_row: Callable[[], None] | None = None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class ChatServing:
    """Validates chat requests, feeds them to the batcher, and shapes the answers."""

    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        default = resolve(settings.default_method, settings.default_method_args)
        self.default_method = default.name
        self.default_args = dict(default.args)
        self.special_tokens = SpecialTokens(engine.tokenizer)  # neutralised in client text
        self.counter = PromptCounter(engine)  # prompt tokens, the context, the image processor
        self.preparing = 0  # requests being validated, about to be submitted
        self.batcher = Batcher(self.run_batch, max_batch_size=settings.max_batch_size,
                               max_queue_size=settings.max_queue_size,
                               batch_wait_s=settings.batch_wait_ms / 1000,
                               incoming=lambda: self.preparing)

    async def start(self) -> None:
        await self.batcher.start()

    async def shutdown(self) -> None:
        await self.batcher.close()

    # Request -> job ---------------------------------------------------------------------------
    async def prepare(self, req: ChatCompletionRequest) -> tuple[BatchKey, EngineJob, dict]:
        """Validate ``req`` fully (see the module docstring); load its image."""
        if req.model != self.settings.model_name:
            raise ApiError(404, f"model {shorten(req.model)} is not served here; available: "
                                f"{self.settings.model_name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")
        _refuse_unsupported(req)
        system, text, image_part, image_param = self._conversation(req.messages)
        system, text = self.special_tokens.neutralise(system), self.special_tokens.neutralise(text)
        limit = self.settings.max_tokens_limit
        asked = req.max_completion_tokens or req.max_tokens  # None: the default, cut to fit
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if asked is not None and asked > limit:
            raise bad_request(f"{name}={asked} is above this server's limit of {limit}", name)
        stops = self._stops(req.stop)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        temperature = self.settings.temperature if req.temperature is None else req.temperature
        do_sample = temperature >= SAMPLING_EPS  # below it, dividing by it overflows: greedy
        method, args = self._method(req.mitigation)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if logprobs is not None and resolve(method, args).search() is not None:
            raise bad_request(f"logprobs are not available with {method!r}: its search chooses "
                              "whole sequences; leave logprobs unset", "logprobs")
        key = BatchKey(method, tuple(sorted(args.items())), do_sample,
                       float(temperature) if do_sample else 1.0,
                       float(req.top_p or 1.0) if do_sample else 1.0, stops, logprobs is not None)
        image = None
        if image_part is not None:
            if not self.engine.multimodal:
                raise bad_request(f"model {self.settings.model_name!r} is text-only and takes no "
                                  "image; remove the image_url part", image_param)
            raw = await fetch_image_bytes(image_part.image_url.url, self.settings, image_param)
            image = await asyncio.to_thread(decode_image, raw, self.settings, image_param,
                                            self.counter.image_processor)
        max_tokens = await self._fit_context(image, text, system, asked,
                                             min(self.settings.default_max_tokens, limit), name)
        # Resolved here, not in the engine: a batch retried request by request replays it.
        seed = fresh_seed() if req.seed is None else req.seed
        job = EngineJob(Request(image=image, prompt=text, system=system,
                                max_new_tokens=max_tokens), seed, max_tokens, logprobs)
        return key, job, {"method": method, **args}

    async def _fit_context(self, image: Any, text: str, system: str | None, asked: int | None,
                           default: int, name: str) -> int:
        """The request's max_tokens after counting its prompt (off the event loop): 400 when
        the prompt is over ``--max-prompt-tokens`` (the prefill one request may ask for) or the
        prompt and max_tokens do not fit the model's context (the engine's rule, see
        ``PromptCounter.fit``)."""
        try:
            counted = await asyncio.to_thread(self.counter.count, image, text, system)
        except Exception as exc:
            logger.warning("the processor could not encode a request (%s: %s)",
                           type(exc).__name__, exc)
            raise bad_request("the model's processor could not encode this request; check the "
                              "text and the image", "messages", "invalid_request") from None
        if counted is None:  # a backend that cannot count: its own limits apply
            return asked or default
        tokens, image_tokens = counted
        bound = self.settings.max_prompt_tokens
        if tokens > bound:
            of_image = f" ({image_tokens} of them for the image)" if image_tokens else ""
            raise bad_request(f"the prompt has {tokens} tokens{of_image}, more than this "
                              f"server's limit of {bound}; shorten the messages", "messages",
                              "context_length_exceeded")
        try:
            return self.counter.fit(tokens, image_tokens, asked, default, name)
        except InputError as exc:
            raise bad_request(str(exc), "messages", "context_length_exceeded") from None

    def _conversation(self, messages: list[ChatMessage]
                      ) -> tuple[str | None, str, ImagePart | None, str | None]:
        lead = 0
        while lead < len(messages) and messages[lead].role in ("system", "developer"):
            lead += 1
        rest = messages[lead:]
        if len(rest) != 1 or rest[0].role != "user":
            roles = ", ".join(m.role for m in messages)
            raise bad_request(
                "this server answers one user turn: send system/developer messages (optional) and "
                "then exactly one user message; multi-turn history, assistant and tool messages "
                f"are not supported (got roles: {roles})", "messages", "unsupported_conversation")
        system_texts = []
        for i, message in enumerate(messages[:lead]):
            texts, images = _split_content(message, f"messages[{i}].content")
            if images:
                raise bad_request(f"a {message.role} message cannot hold an image; put it in the "
                                  "user message", f"messages[{i}].content")
            system_texts += [t for t in texts if t.strip()]
        where = f"messages[{lead}].content"
        texts, images = _split_content(rest[0], where)
        if len(images) > 1:
            raise bad_request(f"at most 1 image per request (the engine takes one image per user "
                              f"turn); got {len(images)}", where, "too_many_images")
        text = "\n".join(texts)
        if not text.strip():
            raise bad_request("the user message has no text; add a text part with the question",
                              where)
        system = "\n\n".join(system_texts) or None
        chars = len(text) + len(system or "")
        if chars > self.settings.max_prompt_chars:
            raise bad_request(f"the prompt has {chars} characters, more than this server's limit "
                              f"of {self.settings.max_prompt_chars}", "messages",
                              "context_length_exceeded")
        return system, text, (images[0] if images else None), (where if images else None)

    def _stops(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOP}", "stop")
        if any(not s for s in stops):
            raise bad_request("stop strings must be non-empty", "stop")
        if any(len(s) > self.settings.max_prompt_chars for s in stops):
            raise bad_request("a stop string is longer than the prompt limit", "stop")
        return tuple(stops)

    def _method(self, mitigation: Mitigation | None) -> tuple[str, dict[str, Any]]:
        """(canonical method name, every parameter value) for a request's ``mitigation``."""
        if mitigation is None:
            return self.default_method, dict(self.default_args)
        if mitigation.method is None:
            name, args = self.default_method, {**self.default_args, **mitigation.params()}
        else:
            name, args = mitigation.method, mitigation.params()
        limit = self.settings.max_prompt_chars  # a text parameter (ICD's role) is prompt text
        values = [*args.values(), *(v for d in args.values() if isinstance(d, dict)
                                    for v in d.values())]
        if any(isinstance(v, str) and len(v) > limit for v in values):
            raise bad_request(f"mitigation: a text parameter is longer than this server's limit "
                              f"of {limit} characters", "mitigation", "invalid_mitigation")
        try:
            method = resolve(name, args)
        except (ValueError, TypeError) as exc:
            raise bad_request(f"mitigation: {clip(str(exc))}", "mitigation",
                              "invalid_mitigation") from None
        return method.name, dict(method.args)

    # Engine thread ------------------------------------------------------------------------------
    def run_batch(self, key: BatchKey, jobs: list[EngineJob],
                  publish: Callable[[int, Any], None],
                  admit: Callable[[int], list[EngineJob]] | None = None) -> list[Any]:
        """Run jobs sharing ``key`` in one engine call, publishing each job's answer as soon as
        its row finishes; waiting jobs with the same key join the running batch (greedy decoding
        and sampling); a failing batch is retried job by job (those not answered yet), so one
        bad request cannot fail the others."""
        jobs = list(jobs)
        method = resolve(key.method, dict(key.method_args))
        joinable = admit is not None and method.search() is None
        # Each row leaves at its own max_tokens (on_token below), so a batch that takes
        # newcomers runs up to the server's limit; logprobs: every job of the key asked for them
        config = DecodingConfig(
            max_new_tokens=(self.settings.max_tokens_limit if joinable
                            else max(j.max_tokens for j in jobs)),
            do_sample=key.do_sample, temperature=key.temperature, top_p=key.top_p,
            stop=key.stop, logprobs=MAX_TOP_LOGPROBS if key.logprobs else None)
        counts = [0] * len(jobs)

        def on_token(i: int, token: int, logprob: TokenLogprob | None) -> bool:
            job = jobs[i]
            counts[i] += 1
            if job.on_token is not None and job.sent < counts[i] <= job.max_tokens:
                job.on_token(token, logprob)
                job.sent = counts[i]
            return counts[i] < job.max_tokens and not job.cancelled

        answered: dict[int, GenerationResult] = {}

        def on_done(i: int, result: GenerationResult) -> None:
            answered[i] = self._fit(result, jobs[i], key.stop)
            publish(i, answered[i])

        def join(n_live: int) -> list[tuple[Request, int | None]]:
            new = admit(n_live)  # only passed on when joinable
            jobs.extend(new)
            counts.extend([0] * len(new))
            return [(j.request, j.seed) for j in new]

        def running(first: int) -> None:
            """Jobs from ``first`` on can be cancelled in the running stream from now on."""
            for i in range(first, len(jobs)):
                jobs[i].cancel_row = partial(stream.cancel, i)
                if jobs[i].cancelled:  # gone before its row existed
                    stream.cancel(i)

        def join_running(n_live: int) -> list[tuple[Request, int | None]]:
            first = len(jobs)
            new = join(n_live)
            running(first)
            return new

        try:
            stream = self.engine.stream([j.request for j in jobs], method, config,
                                        [j.seed for j in jobs],
                                        admit=join_running if joinable else None)
            running(0)
            for event in stream:  # the engine's events, as Engine.run consumes them
                if isinstance(event, TokenEvent):
                    if not on_token(event.request, event.token_id, event.logprob):
                        stream.cancel(event.request)
                else:
                    on_done(event.request, event.result)
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
            logger.warning("a batch of %d failed (%s); running its requests one by one",
                           len(jobs), exc)
            for i, job in enumerate(jobs):
                if i not in answered:
                    answered[i] = self.run_batch(
                        key, [job], lambda _, result, i=i: publish(i, result))[0]
        return [answered[i] for i in range(len(jobs))]

    def _fit(self, result: GenerationResult, job: EngineJob,
             stops: tuple[str, ...]) -> GenerationResult:
        """``result`` as a call with ``max_new_tokens=job.max_tokens`` would have given it (the
        engine's own stop rules, see ``Engine.run``): a row the callback ended at its limit
        says "cancelled", and a search method may run past the limit."""
        ids = result.token_ids[: job.max_tokens]
        logprobs = result.logprobs[: len(ids)] if job.logprobs is not None else None
        if len(ids) == len(result.token_ids) and result.finish_reason != "cancelled":
            return replace(result, token_ids=ids, completion_tokens=len(ids), logprobs=logprobs)
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stops)
        reason = "stop" if stopped or (ids and ids[-1] in self.engine.eos_ids) else "length"
        return replace(result, text=text.strip(), token_ids=ids, finish_reason=reason,
                       completion_tokens=len(ids), logprobs=logprobs)

    # Job -> response ----------------------------------------------------------------------------
    async def complete(self, req: ChatCompletionRequest, http: HttpRequest) -> Response:
        self.preparing += 1
        try:
            key, payload, mitigation = await self.prepare(req)
            updates: asyncio.Queue[tuple[int, TokenLogprob | None]] = asyncio.Queue()
            if req.stream:
                loop = asyncio.get_running_loop()
                payload.on_token = lambda token, logprob: loop.call_soon_threadsafe(
                    updates.put_nowait, (token, logprob))
            job = self._submit(key, payload)
        finally:
            self.preparing -= 1
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream(job, updates, rid, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await self._wait(job, http)
        except ClientGone:
            logger.info("client disconnected; request %s cancelled", rid)
            return Response(status_code=499)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created,
            "model": self.settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason,
                         "logprobs": self._logprobs(result.logprobs, payload)}],
            "usage": _usage(result), "mitigation": mitigation, "seed": payload.seed,
        })

    def _submit(self, key: BatchKey, payload: EngineJob) -> Job:
        try:
            return self.batcher.submit(key, payload)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="rate_limit_exceeded") from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), code="shutting_down") from None

    async def _wait(self, job: Job, http: HttpRequest) -> GenerationResult:
        gone = asyncio.create_task(_disconnected(http))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        finally:
            gone.cancel()
        if not job.future.done():
            self._cancel(job)
            raise ClientGone
        return _outcome(job.future)

    def _cancel(self, job: Job) -> None:
        job.payload.cancelled = True  # a running batch drops the row at its next token
        if job.payload.cancel_row is not None:  # and a search between two of its steps
            job.payload.cancel_row()
        self.batcher.cancel(job)

    def _logprobs(self, entries: list[TokenLogprob] | None, payload: EngineJob
                  ) -> dict[str, Any] | None:
        if entries is None or payload.logprobs is None:
            return None
        text = self.engine.tokenizer.decode
        return {"content": logprob_entries(entries, lambda t: text([t]), payload.logprobs),
                "refusal": None}

    async def _stream(self, job: Job, updates: asyncio.Queue, rid: str, created: int,
                      include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                                    "created": created, "model": self.settings.model_name,
                                    "choices": choices, "seed": payload.seed}
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, allow_nan=False)}\n\n"

        payload: EngineJob = job.payload

        def delta(d: dict, finish: str | None = None,
                  entries: list[TokenLogprob] | None = None) -> list[dict]:
            logprobs = self._logprobs(entries, payload) if entries else None
            return [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": logprobs}]

        text = TextStream(lambda ids: self.engine.tokenizer.decode(ids, skip_special_tokens=True),
                          job.key.stop)
        ids: list[int] = []
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
        try:
            yield chunk(delta({"role": "assistant", "content": ""}))
            while True:
                if updates.empty():
                    if job.future.done():
                        break
                    getter = asyncio.ensure_future(updates.get())
                    await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    token, logprob = getter.result()
                else:
                    token, logprob = updates.get_nowait()
                ids.append(token)
                pending += [logprob] if logprob is not None else []
                piece = text.feed(ids)
                if piece:
                    yield chunk(delta({"content": piece}, entries=pending))
                    pending = []
            try:
                result = _outcome(job.future)
            except ApiError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            else:
                rest = text.finish(result.text)
                if rest or pending:
                    yield chunk(delta({"content": rest}, entries=pending))
                yield chunk(delta({}, result.finish_reason))
                if include_usage:
                    yield chunk([], _usage(result))
            yield "data: [DONE]\n\n"
        finally:  # also on disconnect, when Starlette cancels this generator
            self._cancel(job)


def _outcome(future: asyncio.Future) -> GenerationResult:
    """The job's result; its failure as an ``ApiError`` (400 for bad input, else 500, logged)."""
    exc = future.exception()
    if exc is None:
        return future.result()
    if isinstance(exc, ApiError):
        raise exc
    if isinstance(exc, VeridicalError) or (isinstance(exc, ValueError) and _raised_here(exc)):
        raise bad_request(str(exc), code="invalid_request")
    if isinstance(exc, ValueError):  # a library refused the input: its text names internals
        logger.warning("generation refused the input", exc_info=exc)
        raise bad_request("the model could not process this request; check the text and the "
                          "image", code="invalid_request")
    logger.error("generation failed", exc_info=exc)
    raise ApiError(500, f"internal error during generation ({type(exc).__name__}); see the "
                        "server log", code="internal_error")


def _raised_here(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by veridical's own code (its message is written for users),
    not inside a library (whose message names internals)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("veridical")


def _usage(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": result.image_tokens},
    }


async def _disconnected(http: HttpRequest) -> None:
    """Return when the client disconnects (the body has been read, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _split_content(message: ChatMessage, where: str) -> tuple[list[str], list[ImagePart]]:
    content = message.content
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts = [p.text for p in content if p.type == "text"]
    images = [p for p in content if isinstance(p, ImagePart)]
    return texts, images


_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "audio": "audio output", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning effort",
}


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    """400 for OpenAI fields this server cannot honour, when they ask for a non-default."""
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported: this server returns one choice (n=1); "
                          "send several requests with different seeds instead", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported; leave it unset or 0", name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported; leave it unset", "logit_bias")
    fmt = req.response_format
    if fmt and fmt.get("type", "text") != "text":
        raise bad_request("response_format other than text is not supported", "response_format")
    if req.modalities and list(req.modalities) != ["text"]:
        raise bad_request("only the text modality is supported", "modalities")
    for name, what in _UNSUPPORTED.items():
        value = getattr(req, name)
        if value and value != "none":
            raise bad_request(f"{what} is not supported by this server; leave {name} unset", name)
