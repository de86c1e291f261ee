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
- Prefill (several query positions): the attention output of every row comes from SDPA. For
  the rows and query positions an edit touches (the last query position: the one that produces
  the next token; or the last ``plan.n_new`` when OPERA feeds candidates side by side), the
  function recomputes attention explicitly for those rows only, ``(n, H, n_new, kv)``, applies
  the edit and replaces their output: no full attention matrix is materialised.
- Decode (one query position, on the torch route): one explicit pass for every row, ``(B, H, 1,
  kv)`` logits -> edits -> softmax -> edits of the weights -> values, instead of SDPA plus a
  recomputation of the edited rows; rows the plan does not edit get plain attention.

Edit kinds (:class:`AttentionEdit`):
- ``edit_logits``: pre-softmax, on the scaled logits ``q k^T * scaling`` with the mask applied
  (masked keys at the dtype's minimum, as the references' eager code): PAI, FIA.
- ``edit_probs``: post-softmax, at decode steps: VAR (its prefill part is ``post_attention``).
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

    kernel_free = False  # True: only head_scale, which needs nothing from the fused kernel

    def layers(self) -> set[int]:
        return set()

    def edit_logits(self, layer: int, logits: torch.Tensor, plan: EditPlan
                    ) -> torch.Tensor | None:
        """Return edited copies of ``logits`` (n, H, 1, kv) of the last query position of the
        plan's rows (``plan.keys()`` gives their (n, kv) image keys); None when this edit has no
        pre-softmax part."""
        return None

    def edit_probs(self, layer: int, probs: torch.Tensor, plan: EditPlan
                   ) -> torch.Tensor | None:
        """Decode steps only: edited copies of the post-softmax weights ``probs`` (n, H, 1, kv)
        of the plan's rows, or None."""
        return None

    def head_scale(self, layer: int, plan: EditPlan) -> torch.Tensor | None:
        """Per-head output factors (n, H) for the last query position, or None."""
        return None

    def post_attention(self, layer: int, inputs: AttentionInputs, plan: EditPlan,
                       out: torch.Tensor) -> torch.Tensor | None:
        """Full control after the other edits: return a new output (B, q, H, D) or None.
        For edits that need post-softmax weights of several query positions (VAR)."""
        return None

    def kernel_args(self, layer: int, inputs: AttentionInputs, plan: EditPlan
                    ) -> dict[str, object] | None:
        """This edit as arguments of ``veridical.kernels.attention`` (``pre_softmax=`` or
        ``var=``, covering every row: rows the plan does not edit get no edit), or None when it
        has none: then the layer runs on the torch route. ``head_scale`` is applied after."""
        return None


@dataclass
class AttentionInputs:
    """What the attention function received (query (B, H, q, D), key/value (B, Hkv, kv, D))."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float


@dataclass
class EditPlan:
    """What the attention function applies during one forward."""

    edits: list[AttentionEdit]
    rows: torch.Tensor  # (R,) bool: rows the edits apply to
    image_keys: torch.Tensor  # (R, kv) bool: image-token keys of this forward (cache + new)
    row_data: dict[str, torch.Tensor] = field(default_factory=dict)  # (R, ...) per-row state
    # (R, kv_past, ...) per-key state of the cached keys (e.g. VAR's sink flags), and the same
    # for the keys of this forward, filled by hooks during it; the engine appends ``fresh``.
    key_state: dict[str, torch.Tensor] = field(default_factory=dict)
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)
    impl: str = "auto"  # the kernels' dispatch: "auto" (fused kernel on CUDA), "triton", "torch"
    # How many trailing query positions produce next tokens: 1, or Q side-by-side candidates
    # (OPERA; the mask is then a 4D tree mask and edits apply to all Q positions).
    n_new: int = 1
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # what edits recorded
    index: torch.Tensor | None = None  # rows.nonzero(), when the caller has it already

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = self.rows.nonzero().flatten()
        self.all_rows = len(self.index) == len(self.rows)
        # per edited layer, the edits that apply to it (none when no row is edited)
        self.layer_edits: dict[int, list[AttentionEdit]] = {}
        for edit in self.edits if len(self.index) else ():
            for layer in edit.layers():
                self.layer_edits.setdefault(layer, []).append(edit)
        self.memo: dict[str, object] = {}  # what edits derive once per forward, for every layer

    def keys(self) -> torch.Tensor:
        """(n, kv) image keys of the edited rows."""
        return self.remember("keys", lambda: self.image_keys if self.all_rows
                             else self.image_keys[self.index])

    def data(self, name: str) -> torch.Tensor:
        """(n, ...) per-row state ``name`` of the edited rows (from ``Method.prepare``)."""
        return self.row_data[name][self.index]

    def key_flags(self, name: str, layer: int | None = None) -> torch.Tensor:
        """(R, kv, ...) per-key state ``name`` over the cached keys and this forward's keys
        (``[..., layer]`` of it when ``layer`` is given)."""
        fresh, past = self.fresh[name], self.key_state.get(name)
        if layer is not None:
            fresh, past = fresh[..., layer], (past[..., layer] if past is not None else None)
        return fresh if past is None else torch.cat([past, fresh], dim=1)

    def remember(self, key: str, make):
        """``make()``, computed once per forward (the plan lives for one forward)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


_PLAN: ContextVar[EditPlan | None] = ContextVar("veridical_edit_plan", default=None)


def current_plan() -> EditPlan | None:
    """The plan of the forward running now (None outside an edited forward)."""
    return _PLAN.get()


@contextlib.contextmanager
def plan_active(plan: EditPlan | None) -> Iterator[None]:
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def veridical_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """SDPA, then the active plan's edits on the last query position of its rows (module
    docstring; decode steps take one explicit pass instead)."""
    plan = _PLAN.get()
    pre = plan.layer_edits.get(getattr(module, "layer_idx", None)) if plan is not None else None
    if not pre:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    idx = plan.index.to(query.device)
    n = plan.n_new  # the trailing query positions that produce next tokens
    fused = _fused(layer, pre, plan, module, query, key, value, attention_mask, scaling)
    if fused is not None:
        out = fused
        for edit in pre:
            scale = edit.head_scale(layer, plan)
            if scale is not None:
                out[idx, -n:] = out[idx, -n:] * scale.to(out.dtype)[:, None, :, None]
        return out, None
    if query.shape[2] == 1:
        return _decode_step(layer, pre, plan, idx, module, query, key, value, attention_mask,
                            scaling), None
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
    out = out.clone()
    logits = _last_row_logits(module, query, key, attention_mask, scaling, idx, n)
    edited = False
    for edit in pre:
        new = edit.edit_logits(layer, logits, plan)
        if new is not None:
            logits, edited = new, True
    if edited:
        groups = getattr(module, "num_key_value_groups", 1)
        v = repeat_kv(value[idx], groups)  # (n, H, kv, D)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out[idx, -n:] = torch.matmul(probs, v).transpose(1, 2)  # (n, q, H, D)
    for edit in pre:
        scale = edit.head_scale(layer, plan)
        if scale is not None:
            out[idx, -n:] = out[idx, -n:] * scale.to(out.dtype)[:, None, :, None]
    out = _post_attention(layer, pre, plan, module, query, key, value, attention_mask, scaling,
                          out)
    return out, weights


def _decode_step(layer, edits, plan, idx, module, query, key, value, attention_mask, scaling
                 ) -> torch.Tensor:
    """One query position: explicit attention for every row with the edits on the plan's rows
    (``idx``, on the query's device), (B, 1, H, D)."""
    logits = row_logits(module, query, key, attention_mask, scaling, None)
    logits = _edit_rows(logits, "edit_logits", layer, edits, plan, idx)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    probs = _edit_rows(probs, "edit_probs", layer, edits, plan, idx)
    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.matmul(probs.to(value.dtype), repeat_kv(value, groups)).transpose(1, 2)
    for edit in edits:
        scale = edit.head_scale(layer, plan)
        if scale is None:
            continue
        factor = scale.to(out.dtype)[:, None, :, None]
        out = out * factor if plan.all_rows else out.index_copy(0, idx, out[idx] * factor)
    out = _post_attention(layer, edits, plan, module, query, key, value, attention_mask, scaling,
                          out)
    return out.contiguous()


def _edit_rows(full: torch.Tensor, hook: str, layer, edits, plan, idx) -> torch.Tensor:
    """``full`` (B, H, 1, kv) with its plan rows through each edit's ``hook`` in turn."""
    rows = full if plan.all_rows else full[idx]
    edited = None
    for edit in edits:
        new = getattr(edit, hook)(layer, rows if edited is None else edited, plan)
        edited = new if new is not None else edited
    if edited is None:
        return full
    return edited if plan.all_rows else full.index_copy(0, idx, edited)


def _post_attention(layer, edits, plan, module, query, key, value, attention_mask, scaling,
                    out: torch.Tensor) -> torch.Tensor:
    """``out`` after every edit's ``post_attention``."""
    inputs = AttentionInputs(module, query, key, value, attention_mask,
                             scaling if scaling is not None else query.shape[-1] ** -0.5)
    for edit in edits:
        new = edit.post_attention(layer, inputs, plan, out)
        if new is not None:
            out = new
    return out


def _fused(layer, edits, plan, module, query, key, value, attention_mask, scaling):
    """The layer through ``veridical.kernels.attention`` when the plan's dispatch picks the
    fused kernel and every edit maps onto it; else None (the torch route above)."""
    from veridical import kernels

    if plan.n_new > 1:  # side-by-side candidates carry a tree mask the kernel does not take
        return None
    if kernels.route(query, plan.impl) != "triton":
        return None
    inputs = AttentionInputs(module, query, key, value, attention_mask,
                             scaling if scaling is not None else query.shape[-1] ** -0.5)
    kwargs: dict[str, object] = {}
    for edit in edits:
        args = edit.kernel_args(layer, inputs, plan)
        if args is None and not edit.kernel_free:
            return None
        for name, value_ in (args or {}).items():
            if name in kwargs:
                return None  # two edits of one kind: the torch route composes them
            kwargs[name] = value_
    padding = None
    if attention_mask is not None:
        last = attention_mask[:, 0, -1, :]
        padding = ~last if last.dtype == torch.bool else last < 0
    out, _ = kernels.attention(query, key, value, scaling=inputs.scaling, key_padding=padding,
                               causal=True, impl="triton", **kwargs)
    return out.to(query.dtype)


def last_row_mask(plan: EditPlan, n_rows: int, n_q: int, device) -> torch.Tensor:
    """(B, q) bool: the last query position of the plan's rows."""
    rows = torch.zeros(n_rows, n_q, dtype=torch.bool, device=device)
    rows[plan.index.to(device), -1] = True
    return rows


def _last_row_logits(module, query, key, attention_mask, scaling, idx, n: int = 1
                     ) -> torch.Tensor:
    """Scaled, masked logits (n, H, n, kv) of the last ``n`` query positions of rows ``idx``."""
    return row_logits(module, query, key, attention_mask, scaling, idx, last=n)


def row_logits(module, query, key, attention_mask, scaling, idx, last: int | None = None
               ) -> torch.Tensor:
    """Scaled, masked logits (n, H, q, kv) of rows ``idx`` (None: every row; all query
    positions, or the ``last`` ones), masked keys at the dtype's minimum as the references'
    eager code."""
    groups = getattr(module, "num_key_value_groups", 1)
    if idx is None:
        q, k, mask = query, repeat_kv(key, groups), attention_mask
    else:
        q, k = query[idx], repeat_kv(key[idx], groups)  # (n, H, q, D), (n, H, kv, D)
        mask = attention_mask[idx] if attention_mask is not None else None
    if last:
        q = q[:, :, -last:]
        mask = mask[:, :, -last:] if mask is not None else None
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(2, 3)) * scale
    if attention_mask is None:  # no padding: causal, queries aligned to the end of the keys
        n_q, n_k = logits.shape[-2], logits.shape[-1]
        if n_q == 1:  # the last position sees every key
            return logits
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=logits.device).tril(n_k - n_q)
        return logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = torch.where(mask, logits, torch.finfo(logits.dtype).min)
        else:
            logits = (logits + mask).clamp_min(torch.finfo(logits.dtype).min)
    return logits


def register() -> None:
    AttentionInterface.register(NAME, veridical_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def set_text_attention(model: torch.nn.Module, name: str, multimodal: bool) -> str | dict:
    """Switch the language model (only) to the attention implementation ``name`` through
    transformers' public ``set_attn_implementation``; return what :func:`restore` restores.
    The one place that reads a config's current implementation (transformers keeps it in a
    private attribute and offers no public getter)."""
    config = model.config
    if multimodal:
        previous: str | dict = {"text_config": config.get_text_config()._attn_implementation}
        model.set_attn_implementation({"text_config": name})
    else:
        previous = config._attn_implementation
        model.set_attn_implementation(name)
    return previous


@contextlib.contextmanager
def text_attention(model: torch.nn.Module, name: str, multimodal: bool) -> Iterator[None]:
    """The language model on attention ``name`` inside the block (e.g. ``"eager"``)."""
    previous = set_text_attention(model, name, multimodal)
    try:
        yield
    finally:
        restore(model, previous)


def use_edits(model: torch.nn.Module, multimodal: bool) -> str | dict:
    """Switch the language model to the ``veridical`` attention; return what to restore."""
    register()
    return set_text_attention(model, NAME, multimodal)


def restore(model: torch.nn.Module, previous: str | dict) -> None:
    model.set_attn_implementation(previous)
