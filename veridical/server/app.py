"""``create_app(engine, settings)``: the FastAPI application of ``veridical serve``.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` (see ``serving`` for what a chat request may contain). The engine,
the settings and the ``ChatServing`` (with its batcher) live on ``app.state``; the lifespan starts
the batcher and, at shutdown, lets it finish every request already accepted.

The chat body is read by ``Guard`` (with its size and time limits), then parsed and validated
in a worker thread (``protocol.parse_chat_request``), never on the event loop, so a large or
convoluted body cannot hold up other requests; the OpenAPI document still describes it with
``ChatCompletionRequest``'s own JSON schema (bounds exact, as pydantic writes them).

Every error, whatever raised it, is answered in OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` and logged: ``ApiError`` with its own status
and headers; a body that is not JSON -> 400; a body that does not fit the schema -> 422 naming
the most specific offending field (by its path, e.g. ``messages[0].content``); unknown routes ->
404; wrong HTTP method -> 405 with ``Allow``; 429 and 503 with ``Retry-After``; anything
unexpected -> 500 with the traceback in the log only. JSON answers never hold NaN or infinities
(Starlette's encoder refuses them, so a regression is a loud 500, not invalid JSON).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from .errors import ApiError, error_body, shorten
from .guard import Draining, Guard
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    parse_chat_request,
    validation_error,
)
from .serving import ChatServing
from .settings import ServerSettings

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 404, 408, 413, 422, 429, 500, 503)
}
_REQUEST_REF = "#/components/schemas/ChatCompletionRequest"

router = APIRouter()


@router.get("/health", response_model=Health)
async def health(request: Request) -> dict[str, Any]:
    serving: ChatServing = request.app.state.serving
    batcher = serving.batcher
    return {"status": "shutting_down" if batcher.closing else "ok",
            "model": serving.settings.model_name, "queued": batcher.queued,
            "running": batcher.running}


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(request)]}


@router.get("/v1/models/{model:path}", responses=_ERRORS)
async def get_model(model: str, request: Request) -> dict[str, Any]:
    card = _card(request)
    if model != card["id"]:
        raise ApiError(404, f"model {shorten(model)} is not served here; available: "
                            f"{card['id']!r}",
                       param="model", code="model_not_found")
    return card


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={
    **_ERRORS, 200: {"content": {"text/event-stream": {}},
                     "description": "a chat.completion, or server-sent chat.completion.chunk "
                                    "events when stream is true"}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REQUEST_REF}}}}})
async def chat_completions(request: Request) -> Response:
    body = await asyncio.to_thread(parse_chat_request, await request.body())
    return await request.app.state.serving.complete(body, request)


def _card(request: Request) -> dict[str, Any]:
    return {"id": request.app.state.settings.model_name, "object": "model",
            "created": request.app.state.created, "owned_by": "veridical"}


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:
    """The application serving ``engine`` (a loaded ``veridical`` Engine) with ``settings``.
    Raises ``ValueError`` for a bad default method (unknown name or parameter)."""
    serving = ChatServing(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await serving.start()
        logger.info("serving %s (default method %s %s)", settings.model_name,
                    serving.default_method, serving.default_args)
        try:
            yield
        finally:
            logger.info("shutting down: finishing %d queued and %d running requests",
                        serving.batcher.queued, serving.batcher.running)
            await serving.shutdown()

    app = FastAPI(title="veridical", summary="OpenAI-compatible chat completions with "
                                             "hallucination mitigation per request",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.serving = serving
    app.state.created = int(time.time())
    app.state.draining = Draining()
    app.include_router(router)
    _install_error_handlers(app)
    _document_request_body(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_request_bytes,
                       max_concurrent=settings.max_concurrent_requests,
                       body_timeout_s=settings.request_body_timeout_s,
                       max_receiving_bytes=settings.max_receiving_bytes,
                       draining=app.state.draining)
    return app


def begin_shutdown(app: FastAPI) -> None:
    """The server is about to stop (callable from a signal handler or another thread): request
    bodies still being received are answered 503 at once instead of holding up the shutdown."""
    app.state.draining.set()


def _document_request_body(app: FastAPI) -> None:
    """Put ``ChatCompletionRequest``'s JSON schema (and the models it uses) into the OpenAPI
    document's components, where the chat route's request body points."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            request = ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")
            models = schema.setdefault("components", {}).setdefault("schemas", {})
            models.update(request.pop("$defs", {}))
            models["ChatCompletionRequest"] = request
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, error: ApiError) -> JSONResponse:
        if error.status >= 500:
            logger.error("%s %s -> %d %s", request.method, request.url.path, error.status,
                         error.message)
        else:
            logger.warning("%s %s -> %d %s", request.method, request.url.path, error.status,
                           error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return answer(request, ApiError(400, "request body is not valid JSON",
                                            code="invalid_json"))
        return answer(request, validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"no route {shorten(request.url.path)}; see /docs for the API"
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            detail = (f"{request.method} is not allowed on {shorten(request.url.path)}; use "
                      f"{allowed or 'another method'}")
        return answer(request, ApiError(exc.status_code, detail, code=code,
                                        headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s -> 500", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error; see the server log",
                                       "server_error", None, "internal_error"), status_code=500)
