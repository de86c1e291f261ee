"""Per-head scores and massive-activation tests: pure functions over captured tensors.

Nothing here touches a model. The runner (``veridical.heads.capture``) captures, for one
calibration item, the input of every layer's ``o_proj`` at the last prompt position (split into
heads), the post-softmax attention row of that position, and the decoder layers' input hidden
states; these functions turn them into numbers. Shapes: ``L`` decoder layers, ``H`` query heads,
``Dh`` head dim, ``T`` prompt tokens, ``D`` hidden size. Every function returns new float32
tensors and never edits its inputs.

Definitions (each with the paper it comes from):

- Head output: the per-head slice of ``o_proj``'s input, i.e. ``softmax(q k^T / sqrt(Dh)) v`` of
  that head, before the heads are mixed. ``o_proj``'s input is ``(..., H * Dh)`` with head ``i``
  at ``[i * Dh, (i + 1) * Dh)`` in every supported architecture.
- VHD (VHR, arXiv 2412.13949): ``VHD(l, i) = || A_li(v, x) - A_li(x) ||_2``, the L2 distance
  between head ``(l, i)``'s output at the first generation step (the last prompt position) with the
  image ``v`` and with the text-only prompt ``x`` (image removed). The norm of the difference of
  the outputs, as in the paper's equation, not the difference of their norms. VHR's outlier rule
  also needs ``||A_li(x)||_2``, the text-only norm: :func:`head_norms`.
- Image-attention share: ``sum_{j in image tokens} a_li[T - 1, j]``, the post-softmax attention
  mass the last prompt position of head ``(l, i)`` puts on the image tokens; in [0, 1].
- Visual sensitivity (for FIA's head-specific modulation; the paper describes it but its released
  code does not measure it): ``S(l, i) = ||A_li(v, x) - A_li(v0, x)||_2 / ||A_li(v, x)||_2``, the
  relative change of the head's output when the real image ``v`` is replaced by a content-free
  image ``v0`` with the SAME image tokens (the processor's mean image, i.e. an all-zero normalised
  pixel tensor, or VCD-style diffusion noise). VHD asks "does this head read the image at all"
  (image vs no image, different token sequences); S asks "does this head's output depend on what
  the image shows", which is what modulation by visual sensitivity needs. Dividing by the real
  output's norm makes heads of different layers comparable (output norms grow with depth), so S
  can weight heads across the whole model.
- Massive activations (VAR, ICLR 2025; Sun et al. 2024): ``phi = |RMSNorm(h)|`` with RMSNorm
  WITHOUT a weight, ``h / sqrt(mean(h^2) + 1e-6)``, on a decoder layer's input hidden state, as
  VAR's code (``seilk/VisAttnSink``) computes it. A (token, dim) is massive when
  ``phi > tau_eff`` AND ``phi > ratio * median_d phi[token, :]``. ``tau_eff = tau *
  min(1, sqrt(D / 4096))``: VAR's tau = 20 was set on LLaMA-2-7B (D = 4096), where ``phi`` is at
  most ``sqrt(D) = 64``; narrower models get the same fraction of the attainable maximum, models
  of width >= 4096 exactly VAR's 20. The median test keeps ordinary outlier features of narrow
  models out: at a sink token the massive dims carry nearly all of the token's energy, so every
  other dim is tiny. A sink DIMENSION is a dim that is massive at some calibration token in at
  least ``min_layer_fraction`` of the examined layers (massive activations persist across the
  layers once they appear).
"""

from __future__ import annotations

import math

import torch

from veridical.decoding.headmath import (  # noqa: F401 (re-exported)
    RMS_EPS,
    VAR_REFERENCE_WIDTH,
    VAR_TAU,
    as_float,
    check_same_shape,
    effective_tau,
    head_norms,
    head_scores,
    rms_abs,
    sink_dims,
    vhd,
)


def split_heads(o_proj_input: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(..., H * Dh)`` -> ``(..., H, Dh)``: the per-head outputs inside ``o_proj``'s input."""
    x = as_float(o_proj_input, "o_proj_input")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer (the query heads)")
    if x.shape[-1] % num_heads:
        raise ValueError(
            f"o_proj_input has {x.shape[-1]} features, not a multiple of num_heads={num_heads}; "
            "pass the model's number of query heads (config.num_attention_heads)"
        )
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def visual_sensitivity(real: torch.Tensor, counterfactual: torch.Tensor,
                       eps: float = 1e-12) -> torch.Tensor:
    """``||A(v) - A(v0)||_2 / ||A(v)||_2`` per head: ``(..., H, Dh)`` -> ``(..., H)`` (0 where the
    real output is 0)."""
    a, b = as_float(real, "real"), as_float(counterfactual, "counterfactual")
    check_same_shape(a, b, ("real", "counterfactual"))
    diff = torch.linalg.vector_norm(a - b, dim=-1)
    norm = torch.linalg.vector_norm(a, dim=-1)
    return torch.where(norm > eps, diff / norm.clamp_min(eps), torch.zeros_like(diff))


def image_attention_share(last_row: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass on image tokens: ``last_row`` ``(..., H, T)`` post-softmax weights of the last
    prompt position, ``image_mask`` ``(T,)`` bool -> ``(..., H)`` in [0, 1]."""
    w = as_float(last_row, "last_row")
    if not isinstance(image_mask, torch.Tensor) or image_mask.dtype != torch.bool:
        raise ValueError("image_mask must be a bool tensor (T,) marking the image-token positions")
    if image_mask.shape != w.shape[-1:]:
        raise ValueError(
            f"image_mask has shape {tuple(image_mask.shape)} but the attention rows have "
            f"{w.shape[-1]} keys; pass input_ids == image_token_id of the same prompt"
        )
    return (w * image_mask.to(w.device, torch.float32)).sum(-1).clamp(0.0, 1.0)


def massive_mask(phi: torch.Tensor, tau: float, ratio: float) -> torch.Tensor:
    """``(T, D)`` bool: ``phi > tau`` and ``phi > ratio * median(phi[t, :])`` (``phi`` from
    :func:`rms_abs`; ``tau`` already effective)."""
    p = as_float(phi, "phi")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
        raise ValueError(f"ratio={ratio!r} must be a number >= 1, e.g. 10")
    median = p.median(dim=-1, keepdim=True).values
    return (p > tau) & (p > ratio * median)


def select_sink_dims(layer_counts: torch.Tensor, min_layer_fraction: float = 0.5) -> list[int]:
    """Sink dims from ``layer_counts`` ``(L_examined, D)``: how many calibration tokens were massive
    in each (examined layer, dim). A dim qualifies when it is massive at some token in at least
    ``ceil(min_layer_fraction * L_examined)`` layers (and at least one); returned ascending."""
    counts = as_float(layer_counts, "layer_counts")
    if counts.dim() != 2:
        raise ValueError(f"layer_counts must be (layers, hidden), got shape {tuple(counts.shape)}")
    if not 0 < min_layer_fraction <= 1:
        raise ValueError(f"min_layer_fraction={min_layer_fraction!r} must be in (0, 1], e.g. 0.5")
    if counts.shape[0] == 0:
        return []
    need = max(1, math.ceil(min_layer_fraction * counts.shape[0] - 1e-9))
    layers_firing = (counts > 0).sum(0)
    return [int(d) for d in torch.nonzero(layers_firing >= need).flatten()]
