"""``pai``: Paying more Attention to Image (LALBJ/PAI ``attention.py`` + ``CFG.py``).

Attention half: in layers ``start_layer .. L-1`` (the reference: 2..31 of LLaVA-7B's 32; by
default mapped to the model's depth as ``round(2 * L / 32)``), on every head, the pre-softmax
logits of the last query position on image-token keys become ``a + alpha * |a|`` (through the
``veridical`` attention function; the text-only branch runs unedited, as the reference's
``use_cfg`` switch does). Guidance half: ``pai_cfg``'s text-only branch and
``g * (s - s_text) + s_text`` with APC; ``gamma = 1`` leaves only the attention half.
"""

from __future__ import annotations

import torch

from ..attention import AttentionEdit, last_row_mask
from ..method import Param
from ..registry import register
from .pai_cfg import PAICFG


def boost_logits(logits: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``a + f * |a|`` for logits ``a`` (n, H, q, kv) and factors ``f`` broadcast to them (0 on
    the keys left alone): PAI's rule with ``f = alpha`` on image keys, FIA's with per-head
    factors on its two key sets."""
    return logits.addcmul(factor, logits.abs())


def mapped_start(layers: int, paper_start: int = 2, paper_layers: int = 32) -> int:
    return round(paper_start * layers / paper_layers)


class PAIEdit(AttentionEdit):
    def __init__(self, layers: range, alpha: float):
        self._layers, self.alpha = set(layers), alpha

    def layers(self) -> set[int]:
        return self._layers

    def edit_logits(self, layer, logits, plan):
        factor = plan.remember("pai_factor", lambda: self.alpha * plan.keys().to(
            logits.device, logits.dtype)[:, None, None, :])  # (n, 1, 1, kv), once per forward
        return boost_logits(logits, factor)

    def kernel_args(self, layer, inputs, plan):
        from veridical.kernels import PreSoftmax

        q = inputs.query
        keys = plan.image_keys.to(q.device, torch.float32)
        rows = last_row_mask(plan, q.shape[0], q.shape[2], q.device)
        return {"pre_softmax": PreSoftmax(alpha=self.alpha, keys=keys, rows=rows)}


@register
class PAI(PAICFG):
    name = "pai"
    description = "PAI: boost image attention (pre-softmax) plus text-only guidance."
    params = (
        Param("alpha", 0.2, "attention boost on image tokens (0 = off; bounded so attention "
              "scores stay finite)", low=0.0, high=10.0),
        Param("gamma", 1.1, "guidance scale g (1 = off; bounded so scores stay finite)", low=1.0,
              high=100.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max", low=0.0, high=1.0),
        Param("start_layer", -1, "first edited layer (-1: the paper's 2 of 32, scaled)",
              type=int, low=-1),
    )

    def edited_layers(self, engine) -> range:
        """``start_layer .. L-1``, the start mapped from the paper's 2 of 32 when -1."""
        n_layers = len(engine.adapter.decoder_layers(engine.model))
        start = self.args["start_layer"]
        start = mapped_start(n_layers) if start < 0 else start
        if start >= n_layers:
            raise ValueError(f"method {self.name!r}: parameter 'start_layer' = {start} is out of "
                             f"range for a model with {n_layers} layers; allowed: "
                             f"0..{n_layers - 1}")
        return range(start, n_layers)

    def attention_edits(self, engine):
        if self.args["alpha"] == 0:
            return []
        return [PAIEdit(self.edited_layers(engine), self.args["alpha"])]

    # gamma = 1: the attention half alone, as the reference without CFG (no branch, no APC)
    def branches(self):
        return super().branches() if self.args["gamma"] != 1.0 else []

    def delta(self, logits, branch_logits, step):
        return super().delta(logits, branch_logits, step) if branch_logits else None

    def plausibility(self):
        return super().plausibility() if self.args["gamma"] != 1.0 else None
