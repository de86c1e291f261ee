"""Server settings: one pydantic model that is both the configuration and the CLI.

``ServerSettings`` holds every start-up option with its default, range and help text;
``add_settings_args`` turns its fields into ``argparse`` flags (``max_batch_size`` ->
``--max-batch-size``, booleans as ``--flag/--no-flag``), and ``settings_from_args`` builds a
validated model back from the parsed namespace (as llama-cpp-python's server settings do). The one
flag that is not a field name is ``--set KEY=VALUE`` (repeatable), which fills
``default_method_args``. The API key may also come from the environment variable
``VERIDICAL_API_KEY`` (the flag wins).
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_KEY_ENV = "VERIDICAL_API_KEY"
MiB = 1024 * 1024


class ServerSettings(BaseModel):
    """Everything ``veridical serve`` can be told at start-up."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model reference: a folder, hub id, builtin:NAME or "
                                   "tiny-random:ARCH")
    served_model_name: str | None = Field(
        None, description="name clients pass as `model` (default: the --model reference)")
    device: str | None = Field(None, description="torch device (default: the loader's choice)")
    dtype: str | None = Field(None, description="torch dtype name, e.g. bfloat16")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="veridical's own engine (every method) or vLLM (the "
                                    "contrastive family, paged KV cache, tensor parallelism)")
    vllm_args: str | None = Field(
        None, description="vLLM engine arguments as a JSON object, with --backend vllm, e.g. "
                          "'{\"tensor_parallel_size\": 2}'")
    profile_heads: str | None = Field(
        None, description="build the model's head profile at start-up when it has none "
                          "(for fia/var): a folder of images, a SynthCOCO world folder or "
                          "builtin:synthcoco")
    host: str = Field("127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: str | None = Field(
        None, description=f"require `Authorization: Bearer KEY` on /v1 (or set {API_KEY_ENV})")
    default_method: str = Field("none", description="mitigation for requests that name none, "
                                                    "e.g. vcd or vhr+vcd")
    default_method_args: dict[str, Any] = Field(
        default_factory=dict, description="parameters of the default method (--set k=v)")
    max_batch_size: int = Field(
        8, ge=1, le=1024,
        description="most requests decoding together (newcomers join a running batch up to it)")
    max_queue_size: int = Field(64, ge=1, description="waiting requests before answering 429")
    max_concurrent_requests: int = Field(
        256, ge=1, description="requests handled at once, in any stage, before answering 429")
    batch_wait_ms: float = Field(
        20.0, ge=0, le=1000,
        description="under concurrent load, wait up to this long for more requests to join a "
                    "batch")
    allowed_media_dir: Path | None = Field(
        None, description="folder whose images requests may name by path (off by default)")
    allow_remote_media: bool = Field(False, description="fetch http(s) image URLs (off by default)")
    allow_private_media_hosts: bool = Field(
        False, description="let remote image URLs reach loopback, private, link-local and other "
                           "non-public addresses (off by default: only public addresses)")
    remote_media_timeout_s: float = Field(
        10.0, gt=0, description="total time limit of one remote image fetch (resolving, "
                                "connecting, headers and body)")
    max_image_bytes: int = Field(16 * MiB, ge=1, description="largest encoded image (413 above)")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest image in pixels, as sent and as the model's "
                                       "processor would resize it (413 above)")
    max_image_aspect_ratio: float = Field(
        20.0, ge=1, description="largest ratio of an image's long side to its short side (413 "
                                "above)")
    max_request_bytes: int = Field(32 * MiB, ge=1024, description="largest request body (413 above)")
    max_receiving_bytes: int = Field(
        256 * MiB, ge=1024, description="request bodies being received at once, all clients "
                                        "together, in bytes (429 above)")
    request_body_timeout_s: float = Field(
        30.0, gt=0, description="time a client has to send its whole request body (408 after)")
    max_prompt_chars: int = Field(32_000, ge=1, description="longest system + user text (400 above)")
    max_prompt_tokens: int = Field(
        4096, ge=1, description="longest prompt in tokens, image tokens included: bounds the "
                                "prefill of one request (400 above; the model's context bounds "
                                "prompt + max_tokens too)")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    temperature: float = Field(1.0, ge=0, le=2, description="temperature when a request gives none "
                                                            "(0 = greedy), as OpenAI's default")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: "
                                                             "torch's choice)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn and veridical log level")

    @field_validator("vllm_args")
    @classmethod
    def _json_object(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--vllm-args is not JSON ({exc.msg}); give an object such "
                                 "as '{\"tensor_parallel_size\": 2}'") from None
            if not isinstance(parsed, dict):
                raise ValueError("--vllm-args must be a JSON object of vLLM engine arguments")
        return value

    def engine_args(self) -> dict[str, Any]:
        """What ``veridical.load`` takes for this server's model."""
        if self.backend == "vllm":
            return {"backend": "vllm", "dtype": self.dtype, **json.loads(self.vllm_args or "{}")}
        if self.vllm_args:
            raise ValueError("--vllm-args needs --backend vllm")
        return {"device": self.device, "dtype": self.dtype}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


_SPECIAL = {"default_method_args"}  # filled by --set


def _scalar(annotation: Any) -> Any:
    """``int | None`` -> ``int``; plain types unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_settings_args(parser: argparse.ArgumentParser,
                      model: type[BaseModel] = ServerSettings) -> None:
    """One flag per field of ``model`` (see the module docstring)."""
    for name, field in model.model_fields.items():
        if name in _SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _scalar(field.annotation)
        help_text = field.description or ""
        choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
        if choices:
            kind = type(choices[0])
        if field.is_required():
            parser.add_argument(flag, dest=name, required=True, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=help_text)
        else:
            default = field.get_default(call_default_factory=True)
            parser.add_argument(flag, dest=name, type=kind, default=default, choices=choices,
                                help=help_text if default is None
                                else f"{help_text} (default: {default})")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="sets",
                        help="parameter of --default-method (repeatable), e.g. --set alpha=1")


def settings_from_args(args: argparse.Namespace,
                       env: typing.Mapping[str, str] = os.environ) -> ServerSettings:
    """A validated ``ServerSettings`` from parsed flags (raises ``ValueError`` naming the flag)."""
    from veridical import parse_method_sets as parse_sets

    values = {name: getattr(args, name) for name in ServerSettings.model_fields
              if name not in _SPECIAL and hasattr(args, name)}
    values["default_method_args"] = parse_sets(getattr(args, "sets", None))
    if not values.get("api_key"):
        values["api_key"] = env.get(API_KEY_ENV) or None
    return ServerSettings(**values)
