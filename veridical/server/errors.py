"""Errors the server answers with, in OpenAI's envelope.

Every error response body is ``{"error": {"message", "type", "param", "code"}}`` (what the
official ``openai`` client parses into ``APIStatusError``), with the HTTP status that matches the
problem. :class:`ApiError` carries all five, plus the response headers the status calls for
(``Retry-After`` on 429 and 503, ``Allow`` on 405); the helpers below name the common cases.
Messages say what was wrong and how to fix it, never echo request data back (it may be a large
data URL) and never quote a library's own error text (it names internals: file paths, plugins,
helper programs); the details go to the server log.
"""

from __future__ import annotations

from typing import Any

# OpenAI's `type` per status; `code` is a finer machine-readable reason.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
RETRY_AFTER_S = 1  # what a 429 or 503 asks the client to wait, in seconds


class ApiError(Exception):
    """An error answered to the client: status, message, OpenAI's type/param/code, and extra
    response headers (a 429 or 503 always carries ``Retry-After``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})
        if status in (429, 503):
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code or "invalid_value")


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param=param, code="payload_too_large")


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing a client's value in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(message: str, limit: int = 400) -> str:
    """A message that may quote a client's value, cut in the middle to ``limit`` characters (its
    start names the problem, its end the allowed values)."""
    if len(message) <= limit:
        return message
    half = (limit - 5) // 2
    return f"{message[:half]} ... {message[-half:]}"
