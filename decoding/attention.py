"""Attention edits through transformers' public ``AttentionInterface`` (never patched internals).

Contract:
- ``use_edits(model)`` registers the attention function ``"veridical"`` together with its mask
  function (``AttentionMaskInterface``; without it the attention mask arrives as None and left
  padding would be silently ignored) and switches only the language model to it. Without an
  active plan the function IS transformers' SDPA path, so outputs are unchanged.
- The engine activates an :class:`EditPlan` around each forward (``plan_active``): the edits of
  the method, which rows they apply to (the real-input rows; extra branches run unedited, as PAI's
  text-only branch must), and per row which keys are image tokens. Edits reach the attention
  function through this context, not through extra ``generate`` kwargs.
- The attention output of every row comes from SDPA. For the rows and query positions an edit
  touches (the last query position: the one that produces the next token), the function
  recomputes attention explicitly for those rows only, ``(n, H, 1, kv)``, applies the edit and
  replaces their output: no full attention matrix is materialised.

Edit kinds (:class:`AttentionEdit`):
- ``edit_logits``: pre-softmax, on the scaled logits ``q k^T * scaling`` with the mask applied
  (masked keys at the dtype's minimum, as the references' eager code): PAI, FIA.
- ``head_scale``: per-head factors on the attention output before ``o_proj``: VHR.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "veridical"


class AttentionEdit:
    """One method's change inside attention; override what applies."""

    def layers(self) -> set[int]:
        return set()

    def edit_logits(self, layer: int, logits: torch.Tensor, plan: EditPlan
                    ) -> torch.Tensor | None:
        """Return edited copies of ``logits`` (n, H, 1, kv) of the last query position of the
        plan's rows (``plan.keys()`` gives their (n, kv) image keys); None when this edit has no
        pre-softmax part."""
        return None

    def head_scale(self, layer: int, plan: EditPlan) -> torch.Tensor | None:
        """Per-head output factors (n, H) for the last query position, or None."""
        return None


@dataclass
class EditPlan:
    """What the attention function applies during one forward."""

    edits: list[AttentionEdit]
    rows: torch.Tensor  # (R,) bool: rows the edits apply to
    image_keys: torch.Tensor  # (R, kv) bool: image-token keys of this forward (cache + new)
    row_data: dict[str, torch.Tensor] = field(default_factory=dict)  # (R, ...) per-row state

    def __post_init__(self) -> None:
        self.index = self.rows.nonzero().flatten()
        self.layer_set = set().union(*(e.layers() for e in self.edits)) if self.edits else set()

    def keys(self) -> torch.Tensor:
        """(n, kv) image keys of the edited rows."""
        return self.image_keys[self.index]

    def data(self, name: str) -> torch.Tensor:
        """(n, ...) per-row state ``name`` of the edited rows (from ``Method.prepare``)."""
        return self.row_data[name][self.index]


_PLAN: ContextVar[EditPlan | None] = ContextVar("veridical_edit_plan", default=None)


@contextlib.contextmanager
def plan_active(plan: EditPlan | None) -> Iterator[None]:
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def veridical_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """SDPA, then the active plan's edits on the last query position of its rows."""
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
    plan = _PLAN.get()
    layer = getattr(module, "layer_idx", None)
    if plan is None or layer not in plan.layer_set or plan.index.numel() == 0:
        return out, weights
    idx = plan.index.to(out.device)
    out = out.clone()
    pre = [e for e in plan.edits if layer in e.layers()]
    logits = _last_row_logits(module, query, key, attention_mask, scaling, idx)
    edited = False
    for edit in pre:
        new = edit.edit_logits(layer, logits, plan)
        if new is not None:
            logits, edited = new, True
    if edited:
        groups = getattr(module, "num_key_value_groups", 1)
        v = repeat_kv(value[idx], groups)  # (n, H, kv, D)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out[idx, -1:] = torch.matmul(probs, v).transpose(1, 2)  # (n, 1, H, D)
    for edit in pre:
        scale = edit.head_scale(layer, plan)
        if scale is not None:
            out[idx, -1] = out[idx, -1] * scale.to(out.dtype)[:, :, None]
    return out, weights


def _last_row_logits(module, query, key, attention_mask, scaling, idx) -> torch.Tensor:
    """Scaled, masked logits (n, H, 1, kv) of the last query position of rows ``idx``."""
    groups = getattr(module, "num_key_value_groups", 1)
    q = query[idx, :, -1:, :]  # (n, H, 1, D)
    k = repeat_kv(key[idx], groups)  # (n, H, kv, D)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[idx][:, :, -1:, :]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        else:
            logits = torch.maximum(logits + mask, torch.tensor(torch.finfo(logits.dtype).min))
    return logits


def register() -> None:
    AttentionInterface.register(NAME, veridical_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_edits(model: torch.nn.Module, multimodal: bool) -> str | dict:
    """Switch the language model to the ``veridical`` attention; return what to restore."""
    register()
    config = model.config
    if multimodal:
        text = config.get_text_config()
        previous = {"text_config": text._attn_implementation}
        model.set_attn_implementation({"text_config": NAME})
    else:
        previous = config._attn_implementation
        model.set_attn_implementation(NAME)
    return previous


def restore(model: torch.nn.Module, previous: str | dict) -> None:
    model.set_attn_implementation(previous)
