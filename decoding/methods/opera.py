"""``opera`` / ``opera_fast``: OPERA (shikiw/OPERA), a search strategy.

Over-trust penalty on each beam's top candidates and retrospection-allocation rollback; the
algorithm is in ``veridical.decoding.opera``. Its only forward-time part is a capture in the
LAST decoder layer (through the ``veridical`` attention function): the post-softmax attention
of the side-by-side candidates, max over heads. ``opera_fast`` is the published fast preset
(``threshold=25``, one candidate). OPERA composes with branch methods (their combined scores
pick the candidates) and attention edits (applied to every candidate position); the captured
attention is computed from the layer's unedited logits.
"""

from __future__ import annotations

import functools

import torch

from ..attention import AttentionEdit, row_logits
from ..method import Method, Param
from ..opera import OperaSettings, opera_search
from ..registry import register


class OperaCapture(AttentionEdit):
    """Records ``plan.captured["opera"]``: (n, Q, kv) post-softmax attention of the last ``Q``
    query positions of the plan's rows in ``layer``, max over heads (candidate steps only)."""

    kernel_free = True

    def __init__(self, layer: int):
        self.layer = layer

    def layers(self) -> set[int]:
        return {self.layer}

    def post_attention(self, layer, inputs, plan, out):
        if inputs.query.shape[2] == plan.n_new:  # a candidate step (not the prefill)
            logits = row_logits(inputs.module, inputs.query, inputs.key, inputs.attention_mask,
                                inputs.scaling, plan.index.to(out.device), last=plan.n_new)
            probs = torch.softmax(logits.float(), dim=-1)  # (n, H, Q, kv)
            plan.captured["opera"] = probs.amax(dim=1)
        return None


@register
class OPERA(Method):
    name = "opera"
    description = ("OPERA: beam search over top candidates with an over-trust penalty on "
                   "summary-token attention columns, and rollback.")
    params = (
        Param("beams", 5, "beams", type=int, low=1, high=64),
        Param("scale_factor", 50.0, "scale of the attention window before the column product",
              low=0.0, low_open=True),
        Param("threshold", 15, "rollback when one column is the max more than this many steps "
              "of every beam", type=int, low=0),
        Param("num_attn_candidates", 5, "candidates per beam (and rollbacks per position)",
              type=int, low=1, high=64),
        Param("penalty_weights", 1.0, "weight of the penalty on the candidates' logits (0 = off)",
              low=0.0),
        Param("window", 512, "how many tokens back a rollback may go", type=int, low=1),
    )

    def settings(self) -> OperaSettings:
        a = self.args
        return OperaSettings(a["beams"], a["scale_factor"], a["threshold"],
                             a["num_attn_candidates"], a["penalty_weights"], a["window"])

    def attention_edits(self, engine):
        return [OperaCapture(len(engine.adapter.decoder_layers(engine.model)) - 1)]

    def search(self):
        return functools.partial(opera_search, opts=self.settings(), trace=self.trace)

    trace: list | None = None  # tests: set to a list to record every step


@register
class OPERAFast(OPERA):
    name = "opera_fast"
    description = "OPERA's fast preset: one candidate per beam, threshold 25."
    params = tuple(
        Param(p.name, {"threshold": 25, "num_attn_candidates": 1}.get(p.name, p.default), p.doc,
              p.type, p.low, p.high, p.low_open, p.choices)
        for p in OPERA.params
    )
