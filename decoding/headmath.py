"""Per-head and per-token math that the methods and the head profiler share (pure functions).

- ``head_norms`` and ``vhd``: VHR's per-head output norms and vision-aware head divergence;
- ``rms_abs`` and ``effective_tau``: VAR's sink test ``|h / rms(h)| > tau`` (weightless
  RMSNorm), with ``tau`` scaled to the model's width (20 is VAR's value for 4096-wide models);
- ``head_scores`` and ``sink_dims``: what FIA and VAR read from a head profile (its JSON dict).

``veridical.heads.scores`` re-exports them beside the profiler's own scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch

VAR_TAU = 20.0
VAR_REFERENCE_WIDTH = 4096  # LLaMA-2-7B, where VAR's tau = 20 was set
RMS_EPS = 1e-6


def as_float(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach().to(torch.float32)


def head_norms(heads: torch.Tensor) -> torch.Tensor:
    """L2 norm of each head's output: ``(..., H, Dh)`` -> ``(..., H)``."""
    return torch.linalg.vector_norm(as_float(heads, "heads"), dim=-1)


def check_same_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} but {names[1]} has {tuple(b.shape)}; both must "
            "be head outputs (..., H, Dh) of the same model at the last prompt position"
        )


def vhd(with_image: torch.Tensor, text_only: torch.Tensor) -> torch.Tensor:
    """VHR's vision-aware head divergence ``||A(v, x) - A(x)||_2``: ``(..., H, Dh)`` -> ``(..., H)``."""
    a, b = as_float(with_image, "with_image"), as_float(text_only, "text_only")
    check_same_shape(a, b, ("with_image", "text_only"))
    return torch.linalg.vector_norm(a - b, dim=-1)


def rms_abs(hidden: torch.Tensor, eps: float = RMS_EPS, dims: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``|h / sqrt(mean(h^2, -1) + eps)|``: VAR's weightless RMSNorm, ``(..., D)`` -> ``(..., D)``
    (``(..., len(dims))``: only those dimensions, the same values, when ``dims`` is given)."""
    h = as_float(hidden, "hidden")
    inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return ((h if dims is None else h[..., dims]) * inv).abs()


def effective_tau(tau: float, hidden_size: int) -> float:
    """``tau * min(1, sqrt(hidden_size / 4096))``: VAR set tau = 20 on 4096-wide LLaMA-2-7B;
    narrower models get a proportionally smaller threshold (never a larger one)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau={tau!r} must be a positive number; VAR uses 20")
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size!r} must be a positive integer")
    return float(tau) * min(1.0, math.sqrt(hidden_size / VAR_REFERENCE_WIDTH))


def head_scores(profile: dict[str, Any], name: str) -> torch.Tensor:
    """One per-head score of ``profile`` as an ``(L, H)`` float32 tensor."""
    scores = profile.get("scores", {}) if isinstance(profile, dict) else {}
    if name not in scores:
        raise ValueError(f"score {name!r} is not in the profile; available: "
                         f"{', '.join(scores) or 'none'}")
    return torch.tensor(scores[name], dtype=torch.float32)


def sink_dims(profile: dict[str, Any]) -> list[int]:
    """The massive-activation (sink) dimensions of ``profile``, ascending."""
    try:
        return [int(d) for d in profile["sinks"]["dims"]]
    except (KeyError, TypeError):
        raise ValueError("profile has no sinks.dims; profile the model again") from None
