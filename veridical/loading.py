"""``load(ref)``: a model reference in, a ready :class:`~veridical.decoding.engine.Engine` out.

References:
- ``tiny-random:<arch>``: a tiny random-weight model built from a config (``veridical.tiny``),
  in well under a second; ``tiny-random:<arch>@<seed>`` picks the weights' seed.
- ``builtin:<name>``: a model shipped inside the package (see ``BUILTIN_MODELS``).
- a local Hugging Face model folder, or a hub id (works where the user has network or a cache).

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
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_for
from .errors import InputError, UnsupportedModelError

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"synthcoco-llava": BUILTIN_DIR / "synthcoco-llava"}


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")
    return value


def load(ref: str, device: str | None = None, dtype: Any = None,
         head_profile: str | os.PathLike | dict | None = None):
    """Load ``ref`` (see the module docstring) and return an ``Engine`` with its
    ``head_profile`` attached."""
    if not isinstance(ref, str) or not ref:
        raise InputError(f"model reference must be a non-empty string, got {ref!r}")
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
        name = ref.removeprefix("builtin:")
        path = BUILTIN_MODELS.get(name)
        if path is None or not path.is_dir():
            available = [n for n, p in BUILTIN_MODELS.items() if p.is_dir()]
            raise InputError(
                f"built-in model {name!r} is not shipped in this installation; available: "
                f"{', '.join(available) or 'none yet'} (or use tiny-random:<arch>)"
            )
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
    try:
        config = AutoConfig.from_pretrained(ref)
    except OSError as exc:
        raise InputError(
            f"cannot load model {ref!r}: it is neither a local model folder nor a reachable hub id "
            f"({exc.__class__.__name__}). Use a local folder, builtin:<name> or tiny-random:<arch>"
        ) from None
    adapter = adapter_for(config)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
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

        processor = AutoProcessor.from_pretrained(ref)
    else:
        from transformers import AutoTokenizer

        processor = AutoTokenizer.from_pretrained(ref)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return engine_cls(model, processor, adapter, name=ref)
