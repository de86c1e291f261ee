"""ASGI middleware that guards the API before any route runs: the API key, the body, the slots.

In this order, for every request:

1. Every path under ``/v1`` needs ``Authorization: Bearer <key>`` when the server has a key
   (compared in constant time); ``/health``, ``/openapi.json`` and ``/docs`` stay open. A missing or
   wrong key is a 401, answered before the body is read.
2. The body (of POST, PUT and PATCH) is read here, whole, and replayed to the app:
   - at most ``max_body_bytes`` (by ``Content-Length`` or as it streams in; 413 above; the rest
     of an oversized body is read and discarded, up to a bound, so the client sees the 413
     instead of a reset connection);
   - within ``body_timeout_s`` from the first byte awaited to the last (408 after), so a client
     that declares a body and stops sending holds nothing for long;
   - while bodies being received, all clients together, stay within ``max_receiving_bytes``
     (declared lengths are reserved up front; 429 above), which bounds the memory that slow
     uploads can pin;
   - at shutdown (``Draining`` set), a body still arriving is answered 503 at once, so a stalled
     upload cannot hold up the server's exit.
   A rejected upload's connection is closed (its body may be half sent).
3. Only then does a ``/v1`` request take one of ``max_concurrent`` slots (validating, queued,
   generating or streaming); with none free it is a 429. A client that sends its body slowly
   therefore never holds a slot, and cannot lock others out.

Every 429 and 503 carries ``Retry-After`` (``errors.ApiError``). A plain ASGI class rather than
Starlette's ``BaseHTTPMiddleware``, so streaming responses and disconnect detection pass through
untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from .errors import ApiError

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
DRAIN_FACTOR = 4  # read and drop at most this many times the limit of an oversized body
BODY_METHODS = ("POST", "PUT", "PATCH")


class Draining:
    """A flag set once, when the server begins to shut down. ``set`` may be called from any
    thread or from a signal handler; ``event()`` is awaited on the server's loop."""

    def __init__(self) -> None:
        self.is_set = False
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def event(self) -> asyncio.Event:
        """The flag as an event of the running loop (created on first use)."""
        if self._event is None:
            self._event = asyncio.Event()
            self._loop = asyncio.get_running_loop()
        if self.is_set:
            self._event.set()
        return self._event

    def set(self) -> None:
        self.is_set = True
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)


class _Stop(Exception):
    """Reading the body ended without it: answer ``error`` and close the connection."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, max_concurrent: int,
                 body_timeout_s: float = 30.0, max_receiving_bytes: int | None = None,
                 draining: Draining | None = None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.body_timeout_s = body_timeout_s
        self.max_receiving_bytes = max(max_receiving_bytes or 8 * max_body_bytes, max_body_bytes)
        self.draining = draining or Draining()
        self.active = 0  # /v1 requests holding a slot
        self.receiving = 0  # bytes reserved by bodies being received

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/v1")
        if self.api_key is not None and api and not self._authorized(scope):
            await _reject(scope, send, ApiError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > self.max_body_bytes):
            await self._drain(receive, self.max_body_bytes * DRAIN_FACTOR)
            await _reject(scope, send, self._too_large(), close=True)
            return
        if scope.get("method") in BODY_METHODS:
            try:
                body = await self._read(receive, int(declared) if declared else 0)
            except _Stop as stop:
                await _reject(scope, send, stop.error, close=True)
                return
            if body is None:
                return  # the client left before sending its body
            receive = _replay(body, receive)
        if not api:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_concurrent:
            await _reject(scope, send, ApiError(
                429, f"too many concurrent requests (limit {self.max_concurrent}); retry after a "
                     "short wait", code="rate_limit_exceeded"))
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _read(self, receive: Any, declared: int) -> bytes | None:
        """The whole body, or None if the client disconnected; ``_Stop`` for a body that is too
        large, too slow, or arrives while the server shuts down (module docstring)."""
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        chunks: list[bytes] = []
        total = held = 0
        try:
            while True:
                need = max(declared, total) - held
                if need > 0:
                    if self.receiving + need > self.max_receiving_bytes:
                        raise _Stop(ApiError(
                            429, "the server is receiving too many request bodies at once; "
                                 "retry after a short wait", code="rate_limit_exceeded"))
                    self.receiving += need
                    held += need
                message = await self._next(receive, deadline)
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > self.max_body_bytes:
                    await self._drain(receive, self.max_body_bytes * DRAIN_FACTOR - total)
                    raise _Stop(self._too_large())
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.receiving -= held

    async def _next(self, receive: Any, deadline: float) -> dict[str, Any]:
        """The next ASGI message, unless the deadline passes or the server starts to drain."""
        draining = self.draining.event()
        left = deadline - asyncio.get_running_loop().time()
        if left > 0 and not draining.is_set():
            message = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(draining.wait())
            await asyncio.wait({message, stop}, timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if message.done():
                return message.result()
            message.cancel()
        if draining.is_set():
            raise _Stop(ApiError(503, "the server is shutting down; retry on another instance "
                                      "or later", code="shutting_down"))
        raise _Stop(ApiError(408, f"the request body did not arrive within "
                                  f"{self.body_timeout_s:g} s; send the whole body at once",
                             code="request_timeout"))

    async def _drain(self, receive: Any, budget: int) -> None:
        """Read and drop up to ``budget`` more bytes (bounded in time too)."""
        deadline = asyncio.get_running_loop().time() + min(self.body_timeout_s, 5.0)
        try:
            while budget > 0:
                message = await self._next(receive, deadline)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                budget -= len(message.get("body", b""))
        except _Stop:
            return

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                           self.api_key)
        return False

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is larger than this server's limit of "
                             f"{self.max_body_bytes} bytes", code="payload_too_large")


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


async def _reject(scope: Scope, send: Any, error: ApiError, close: bool = False) -> None:
    logger.warning("%s %s -> %d %s", scope.get("method"), scope.get("path"), error.status,
                   error.message)
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if close:  # the body may be half sent: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
