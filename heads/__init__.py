"""Head profiling: per-(layer, head) scores (VHD, image-attention share, visual sensitivity) and
massive-activation (sink) dimensions of a model, built ahead of time and attached to the model.

Public API:
- ``profile_model(engine, images, prompts, **settings) -> dict``: the JSON-ready profile.
- ``load_or_profile(engine, data, cache_dir=None, ...) -> dict``: the cached profile of the
  model on the calibration ``data`` (key: model fingerprint, calibration digest, settings),
  computed on a miss. ``data`` is the caller's: a folder, a SynthCOCO world folder (the
  command line resolves ``DEFAULT_DATA``, ``"builtin:synthcoco"``, to the built-in world's), an
  image file or a list of images (``calibration_images(data, limit)``); the default prompt is
  "Please describe this image in detail.".
- The model's profile: ``veridical.load`` sets ``engine.head_profile`` (a dict or None) from
  ``find_profile(engine, folder)``: ``MODEL_PROFILE`` (``heads_profile.json``) in the model's
  folder, else the cache's file for the model's fingerprint (``model_profile_path``, written by
  ``save_model_profile``). ``ensure_profile(engine, data)`` builds one ahead of time when the
  engine has none (a server's start-up) and attaches it; ``check_profile(profile, engine)``
  tells whether a profile fits a model. Decoding methods read ``engine.head_profile`` only and
  never profile.
- ``head_scores(profile, name) -> Tensor (L, H)``, ``sink_dims(profile) -> list[int]``.
- ``model_fingerprint(model)``, ``save_profile``, ``load_profile``, ``default_cache_dir()``
  (``$VERIDICAL_CACHE/heads``).
- The math, as pure functions over captured tensors: ``veridical.heads.scores``; the forward
  hooks that capture them: ``veridical.heads.capture``; the CLI ``veridical heads profile``:
  ``veridical.heads.cli``.

Nothing here imports ``veridical.evals``.
"""

from .profile import (
    DEFAULT_DATA,
    DEFAULT_LIMIT,
    DEFAULT_PROMPT,
    HEAD_SCORES,
    MODEL_PROFILE,
    SCHEMA,
    ProfileSettings,
    calibration_images,
    check_profile,
    default_cache_dir,
    ensure_profile,
    find_profile,
    load_or_profile,
    load_profile,
    model_fingerprint,
    model_profile_path,
    profile_model,
    save_model_profile,
    save_profile,
)
from .scores import head_scores, sink_dims

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_LIMIT",
    "DEFAULT_PROMPT",
    "HEAD_SCORES",
    "MODEL_PROFILE",
    "SCHEMA",
    "ProfileSettings",
    "calibration_images",
    "check_profile",
    "default_cache_dir",
    "ensure_profile",
    "find_profile",
    "head_scores",
    "load_or_profile",
    "load_profile",
    "model_fingerprint",
    "model_profile_path",
    "profile_model",
    "save_model_profile",
    "save_profile",
    "sink_dims",
]
