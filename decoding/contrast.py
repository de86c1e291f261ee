"""The contrastive family's logit formulas, as pure functions (never in place).

Each ``*_delta`` is what a method adds to the real branch's logits ``z``; the full reference
formula is ``apc(z + delta, z, beta)`` (see ``veridical.decoding.method.apc``):

- VCD / ICD: ``(1 + a) * z - a * z_neg`` = ``z + a * (z - z_neg)``      (DAMO-NLP-SG/VCD, p1k0pan/ICD)
- RITUAL:    ``z + a_pos * z_pos``                                         (sangminwoo/RITUAL)
- M3ID:      ``z + (z - z_u) * (1 - g_t) / g_t``, ``g_t = exp(-lam * t)``  (RITUAL's re-implementation)
- PAI (CFG): ``g * (s - s_u) + s_u`` on log-probs = ``s + (g - 1) * (s - s_u)`` (LALBJ/PAI)
- SCMoE:     ``(1 + b) * z_strong - b * z_weak``                           (DavidFanzz/SCMoE)

PAI's and M3ID's log-prob forms differ from the logit forms used here by a per-row constant,
which changes neither the softmax nor the argmax nor APC (computed on the real logits).
"""

from __future__ import annotations

import math

import torch


def contrast_delta(z: torch.Tensor, z_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (z - z_neg)``: VCD, ICD, SCMoE, PAI's guidance (alpha = g - 1)."""
    return alpha * (z - z_neg)


def ritual_delta(z_pos: torch.Tensor, alpha_pos: float) -> torch.Tensor:
    """``alpha_pos * z_pos``: RITUAL's complementary (transformed-image) term."""
    return alpha_pos * z_pos


M3ID_MAX_EXPONENT = 30.0  # cap on lam * t: keeps the weight finite (decoding/methods/m3id.py)


def m3id_weight(step: int, lam: float) -> float:
    """``(1 - g_t) / g_t`` with ``g_t = exp(-lam * t)`` (``= e^{lam t} - 1``), with ``lam * t``
    capped at ``M3ID_MAX_EXPONENT``; 0 at the first step, finite at every step."""
    return math.expm1(min(lam * step, M3ID_MAX_EXPONENT))
