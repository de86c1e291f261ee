"""Head profiling: per-(layer, head) scores (VHD, image-attention share, visual sensitivity) and
massive-activation (sink) dimensions, cached per model fingerprint and reused by the methods.

Public API:
- ``profile_model(engine, images, prompts, **settings) -> dict``: the JSON-ready profile.
- ``load_or_profile(engine, data=None, cache_dir=None, ...) -> dict``: the cached profile of the
  model (key: model fingerprint, calibration digest, settings), computed on a miss; default
  calibration: the first 32 images of the built-in SynthCOCO test split with the prompt
  "Please describe this image in detail.".
- ``head_scores(profile, name) -> Tensor (L, H)``, ``sink_dims(profile) -> list[int]``.
- ``model_fingerprint(model)``, ``calibration_images(data, limit)``, ``save_profile``,
  ``load_profile``.
- The math, as pure functions over captured tensors: ``veridical.heads.scores``; the forward
  hooks that capture them: ``veridical.heads.capture``; the CLI ``veridical heads profile``:
  ``veridical.heads.cli``.
"""

from .profile import (
    DEFAULT_LIMIT,
    DEFAULT_PROMPT,
    HEAD_SCORES,
    SCHEMA,
    ProfileSettings,
    calibration_images,
    head_scores,
    load_or_profile,
    load_profile,
    model_fingerprint,
    profile_model,
    save_profile,
    sink_dims,
)

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_PROMPT",
    "HEAD_SCORES",
    "SCHEMA",
    "ProfileSettings",
    "calibration_images",
    "head_scores",
    "load_or_profile",
    "load_profile",
    "model_fingerprint",
    "profile_model",
    "save_profile",
    "sink_dims",
]
