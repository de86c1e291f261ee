"""``load(ref)``: a model reference in, a ready :class:`~veridical.decoding.engine.Engine` out.

References:
- ``tiny-random:<arch>``: a tiny random-weight model built from a config (``veridical.tiny``),
  in well under a second; ``tiny-random:<arch>@<seed>`` picks the weights' seed.
- ``builtin:<name>``: a model shipped inside the package (see ``BUILTIN_MODELS``).
- a local Hugging Face model folder, or a hub id (works where the user has network or a cache).
  Before asking the hub, ``load`` finds out in at most a few seconds whether it can: offline mode
  (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) or a hub that does not answer within
  ``HUB_CHECK_S`` means the local cache only (``local_files_only``), so an unknown name fails at
  once instead of after the hub client's retries.

``device`` is a torch device string, or ``"auto"`` to let accelerate place a model larger than
one GPU (``device_map="auto"``). ``dtype`` is a torch dtype or its name ("bfloat16", ...).

Head profile: the engine's ``head_profile`` (read by ``fia`` and ``var``; see
``veridical.heads``) is ``head_profile`` when given (a path to a profile JSON, or the dict);
else ``heads_profile.json`` in the model's folder (the built-in model ships one); else the
profile cache's file for the model's fingerprint (``$VERIDICAL_CACHE/heads/model-*.json``,
written by ``veridical heads profile``); else None. Loading never computes a profile.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_for
from .errors import InputError, UnsupportedModelError

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"synthcoco-llava": BUILTIN_DIR / "synthcoco-llava"}
HUB_CHECK_S = 3.0  # how long the hub may take to answer before only the cache is used


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")
    return value


BACKENDS = ("transformers", "vllm")


def load(ref: str, device: str | None = None, dtype: Any = None,
         head_profile: str | os.PathLike | dict | None = None, backend: str = "transformers",
         **vllm_args: Any):
    """Load ``ref`` (see the module docstring) and return an ``Engine`` with its
    ``head_profile`` attached; ``backend="vllm"`` returns the vLLM backend's engine instead
    (``veridical.vllm``), with ``vllm_args`` passed to ``vllm.LLM``."""
    if not isinstance(ref, str) or not ref:
        raise InputError(f"model reference must be a non-empty string, got {ref!r}")
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from .vllm.backend import load_vllm

        if device not in (None, "cuda", "cpu") or head_profile is not None:
            raise InputError("backend='vllm' places the model itself and reads no head profile; "
                             "leave device and head_profile unset (pass vLLM's own arguments, "
                             "e.g. tensor_parallel_size=2)")
        if dtype is not None:
            vllm_args.setdefault("dtype", str(dtype).removeprefix("torch."))
        return load_vllm(ref, **vllm_args)
    if vllm_args:
        raise InputError(f"{', '.join(vllm_args)}: unknown argument(s) of load; vLLM's engine "
                         "arguments need backend='vllm'")
    engine, folder = _load_engine(ref, device, _dtype(dtype))
    engine.head_profile = _head_profile(engine, head_profile, folder)
    return engine


def _head_profile(engine, given: str | os.PathLike | dict | None, folder: Path | None
                  ) -> dict | None:
    from veridical import heads

    if given is None:
        return heads.find_profile(engine, folder)
    try:
        profile = given if isinstance(given, dict) else heads.load_profile(given)
        return heads.check_profile(profile, engine)
    except ValueError as exc:
        raise InputError(f"head_profile: {exc}") from None


def builtin_path(ref: str) -> Path:
    """The folder of the shipped model ``builtin:<name>``, or an ``InputError`` listing them."""
    name = ref.removeprefix("builtin:")
    path = BUILTIN_MODELS.get(name)
    if path is None or not path.is_dir():
        available = [n for n, p in BUILTIN_MODELS.items() if p.is_dir()]
        raise InputError(
            f"built-in model {name!r} is not shipped in this installation; available: "
            f"{', '.join(available) or 'none yet'} (or use tiny-random:<arch>)"
        )
    return path


def _load_engine(ref: str, device: str | None, torch_dtype: torch.dtype | None):
    """``(engine, the model's folder or None)``."""
    from veridical.decoding.engine import Engine

    if ref.startswith("tiny-random:"):
        from .tiny import ARCHS, TEXT_ARCHS, build_tiny

        arch, _, seed = ref.removeprefix("tiny-random:").partition("@")
        if arch not in ARCHS + TEXT_ARCHS:
            raise InputError(
                f"unknown tiny architecture {arch!r} in {ref!r}; use one of: "
                + ", ".join(f"tiny-random:{a}" for a in ARCHS + TEXT_ARCHS)
            )
        if not seed.isdigit() and seed:
            raise InputError(f"seed {seed!r} in {ref!r} must be an integer, e.g. {arch}@1")
        model, processor = build_tiny(arch, seed=int(seed or 0))
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device not in (None, "auto"):
            model = model.to(device)
        return Engine(model, processor, adapter_for(model.config), name=ref), None
    if ref.startswith("builtin:"):
        path = builtin_path(ref)
        engine = _load_pretrained(str(path), device, torch_dtype, Engine)
        engine.name = ref  # messages and profiles name it as the user did
        return engine, path
    local = Path(ref).expanduser()
    return _load_pretrained(ref, device, torch_dtype, Engine), local if local.is_dir() else None


def _load_pretrained(ref: str, device: str | None, dtype: torch.dtype | None, engine_cls):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from .processing import load_processor

    local = Path(ref).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise InputError(
            f"{ref!r} is a folder without config.json; point at a Hugging Face model folder"
        )
    if not local.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise InputError(f"model folder {ref!r} does not exist; give a model folder, a hub id "
                         "(org/name), builtin:<name> or tiny-random:<arch>")
    no_hub = None if local.exists() else hub_unavailable()  # why only the cache can serve
    hub = {"local_files_only": True} if no_hub else {}
    try:
        config = AutoConfig.from_pretrained(ref, **hub)
    except OSError as exc:
        if no_hub:
            raise InputError(
                f"cannot load model {ref!r}: it is not a local model folder, and not in the "
                f"Hugging Face cache while {no_hub}. Use a local folder, builtin:<name> or "
                "tiny-random:<arch>, or download the model where the hub is reachable") from None
        raise InputError(
            f"cannot load model {ref!r}: it is neither a local model folder nor a reachable hub id "
            f"({exc.__class__.__name__}). Use a local folder, builtin:<name> or tiny-random:<arch>"
        ) from None
    adapter = adapter_for(config)
    kwargs: dict[str, Any] = dict(hub)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device == "auto":
        kwargs["device_map"] = "auto"
    auto = AutoModelForImageTextToText if adapter.multimodal else AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command
    try:
        model = auto.from_pretrained(ref, **kwargs)
    except ValueError as exc:
        raise UnsupportedModelError(f"cannot load {ref!r} with {auto.__name__}: {exc}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if device not in (None, "auto"):
        model = model.to(device)
    if adapter.multimodal and local.is_dir():
        processor = load_processor(local)
    elif adapter.multimodal:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(ref, **hub)
    else:
        from transformers import AutoTokenizer

        processor = AutoTokenizer.from_pretrained(ref, **hub)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return engine_cls(model, processor, adapter, name=ref)


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be asked (offline mode, or no answer within
    ``HUB_CHECK_S``), or None when it answers."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]} (offline mode)"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (offline mode)"
    try:  # any HTTP answer, even an error status, means the hub is reachable
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=HUB_CHECK_S).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:  # URLError, timeout, refused, no DNS
        reason = getattr(exc, "reason", None) or exc
        return f"the hub ({constants.ENDPOINT}) cannot be reached ({reason})"
    return None
