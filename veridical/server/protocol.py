"""Request and response models of the OpenAI chat API, as far as this server speaks it.

Requests: ``ChatCompletionRequest`` accepts the fields the official ``openai`` client sends for a
chat completion. Fields the server understands are typed and range-checked here (a violation is
a 422 naming the field); fields OpenAI defines but this server cannot honour (tools,
``response_format``, penalties, ``n > 1``, ...) are accepted by the schema and
refused by ``serving`` with a 400 naming them, when they ask for something other than the
default; harmless bookkeeping fields (``user``, ``metadata``, ``store``, ...) are ignored; any
other field is a 422. The extra field ``mitigation`` picks the hallucination mitigation:
``{"method": "vcd", "alpha": 1.0}`` (parameters beside ``method``, validated against the registry
by ``serving``).

Responses: ``ChatCompletion`` and ``ChatCompletionChunk`` (streaming), with ``usage`` counting
prompt tokens (image tokens included, and also reported in ``prompt_tokens_details``) and
completion tokens, plus ``mitigation``: the method and every parameter value that was applied.

Parsing (:func:`parse_chat_request`, CPU-bound: the server runs it in a worker thread, off the
event loop): the body must be JSON (``NaN``/``Infinity`` are not JSON: 400), UTF-8 text without a
lone UTF-16 surrogate in any string (``"\\ud800"`` escaped alone: 400 naming the field; a
tokenizer cannot encode it), every number finite, at most ``MAX_MESSAGES`` messages and
``MAX_CONTENT_PARTS`` parts per message (422), at most ``MAX_JSON_VALUES`` JSON values nested at
most ``MAX_JSON_DEPTH`` deep (400); these bounds are checked before the schema, so pydantic's
validation (one long call that holds the interpreter) has bounded work. Types are strict: a
string is not a number (``"max_tokens": "5"``), a boolean is not a number (``true``), ``"yes"``
is not a boolean; integers are accepted where numbers are.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError

# Seeds: -2**63 <= seed <= 2**63, bounds that are exact as JSON numbers in every client (a float64
# bound such as 2**63 - 1 is not) and that torch.Generator.manual_seed accepts.
SEED_BOUND = 2**63
MAX_MESSAGES = 32
MAX_CONTENT_PARTS = 32
MAX_JSON_VALUES = 10_000
MAX_JSON_DEPTH = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="data:image/...;base64,... (default); a path under "
                                 "--allowed-media-dir; http(s) only with --allow-remote-media")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class Mitigation(BaseModel):
    """``{"method": "vcd", "alpha": 1}``: the method (start-up default when absent) and its
    parameters, flat (``alpha``), qualified (``vcd.alpha``) or nested (``{"vcd": {...}}``)."""

    model_config = ConfigDict(extra="allow")
    method: str | None = Field(None, description="registered method, e.g. vcd or vhr+vcd")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of "
                                                            "max_completion_tokens")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-SEED_BOUND, le=SEED_BOUND)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    n: int | None = Field(None, ge=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    mitigation: Mitigation | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Defined by OpenAI, refused by serving when not at their default.
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    # Bookkeeping, accepted and ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    image_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    mitigation: dict[str, Any] = Field(description="the method and parameters applied")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "veridical"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "shutting_down"]
    model: str
    queued: int
    running: int


# Parsing ----------------------------------------------------------------------------------------
def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """A chat request from its body, or an ``ApiError`` (see "Parsing" in the module docstring)."""
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "request body is not valid JSON (UTF-8, no NaN or Infinity)",
                       code="invalid_json") from None
    if isinstance(data, dict):
        _check_counts(data)
    _check_values(data)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_counts(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > MAX_MESSAGES:
        raise ApiError(422, f"messages: {len(messages)} messages, more than the limit of "
                            f"{MAX_MESSAGES}; send system messages (optional) and one user "
                            "message", param="messages", code="too_many_messages")
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
            raise ApiError(422, f"messages[{i}].content: {len(content)} parts, more than the "
                                f"limit of {MAX_CONTENT_PARTS}; join the text parts",
                           param=f"messages[{i}].content", code="too_many_parts")


def _check_values(data: Any) -> None:
    """Bounded size and depth, finite numbers, strings without lone surrogates."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    seen = 0
    while stack:
        value, path, depth = stack.pop()
        seen += 1
        if seen > MAX_JSON_VALUES or depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body has more than {MAX_JSON_VALUES} JSON values "
                                f"or nests deeper than {MAX_JSON_DEPTH} levels; send a smaller "
                                "request", code="request_too_complex")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"{_cut(path) or 'body'}: numbers must be finite",
                           param=_cut(path), code="invalid_value")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)  # the key itself is not echoed back
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # only a lone surrogate (U+D800-U+DFFF) cannot be encoded
        param = _cut(path)
        raise ApiError(400, f"{param or 'body'}: the text holds a lone UTF-16 surrogate (an "
                            "unpaired \\ud800-\\udfff escape), which is not a character; send "
                            "valid Unicode text", param=param, code="invalid_text") from None


def _cut(path: str, limit: int = 80) -> str | None:
    """A field path to echo back: at most ``limit`` characters (keys are client data)."""
    return (path if len(path) <= limit else path[: limit - 3] + "...") or None


_TYPE_LABELS = {"str", "int", "float", "bool", "none", "dict", "list"}


def validation_error(errors: list[Any]) -> ApiError:
    """pydantic's errors -> a 422 naming the most specific offending field (by its path)."""
    # The deepest error is the most specific (a union reports one error per member).
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={
        "loc": (), "msg": "invalid request", "type": ""})
    param = _cut(_param(first.get("loc", ())) or "")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}"
    return ApiError(422, message, param=param, code="invalid_type")


def _param(loc: Any) -> str | None:
    """pydantic's ``("body", "messages", 0, "content", "list[...]", 0, "text", "text")`` ->
    ``"messages[0].content[0].text"``: union-member labels dropped, and a discriminator tag
    (OpenAI's part types equal their field names) merged with the field it selects."""
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "body" and not out:
            continue
        elif ("[" in part or part in _TYPE_LABELS or part[:1].isupper()
              or part == previous):
            pass
        else:
            out += f".{part}" if out else part
        previous = part
    return out or None
