"""ASGI middleware that guards the API before any route runs: the API key and the body size.

- Every path under ``/v1`` needs ``Authorization: Bearer <key>`` when the server has a key
  (compared in constant time); ``/health``, ``/openapi.json`` and ``/docs`` stay open. A missing or
  wrong key is a 401, answered before the body is read.
- At most ``max_concurrent`` requests to ``/v1`` are handled at once (validating, queued,
  generating or streaming); one more is a 429 before its body is read, which bounds the memory
  that buffered bodies and decoded images can take.
- Request bodies are read here, up to ``max_body_bytes``, and replayed to the app; a larger body
  (by ``Content-Length`` or as it streams in) is a 413. The rest of an oversized body is read and
  discarded (up to a bound) so the client sees the 413 instead of a reset connection.

A plain ASGI class rather than Starlette's ``BaseHTTPMiddleware``, so streaming responses and
disconnect detection pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from .errors import ApiError

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
DRAIN_FACTOR = 4  # read and drop at most this many times the limit of an oversized body


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 max_concurrent: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.active = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/v1")
        if self.api_key is not None and api and not self._authorized(scope):
            await _reject(scope, send, ApiError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key"))
            return
        if not api:
            await self._guarded(scope, receive, send)
            return
        if self.active >= self.max_concurrent:
            await _reject(scope, send, ApiError(
                429, f"too many concurrent requests (limit {self.max_concurrent}); retry after a "
                     "short wait", code="rate_limit_exceeded"))
            return
        self.active += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.active -= 1

    async def _guarded(self, scope: Scope, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > self.max_body_bytes):
            await _drain(receive, self.max_body_bytes * DRAIN_FACTOR)
            await _reject(scope, send, self._too_large())
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                await _drain(receive, self.max_body_bytes * DRAIN_FACTOR - total)
                await _reject(scope, send, self._too_large())
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

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


async def _drain(receive: Any, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


async def _reject(scope: Scope, send: Any, error: ApiError) -> None:
    logger.warning("%s %s -> %d %s", scope.get("method"), scope.get("path"), error.status,
                   error.message)
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
