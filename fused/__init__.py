"""Attention kernels: a torch reference that is the specification, fused Triton kernels for
GPUs, and compiled CPU loops for VAR's per-layer work (:mod:`.cpu`, numba). Importing this
package never requires triton, numba or a GPU.

``attention(q, k, v, *, scaling, key_padding, causal, pre_softmax, var, export, impl)`` returns
``(out (B, Tq, H, D), probs | None)`` as transformers' attention functions do; the contract
(layout, masking, each edit) is in :mod:`.reference`. ``impl``:

- ``"triton"``: the fused kernel (:mod:`.triton_attention`): CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (tests);
- ``"torch"``: PyTorch SDPA when nothing is edited or exported, else the torch reference;
- ``"auto"``: ``"triton"`` for CUDA tensors (fp16/bf16/fp32, head_dim <= 256) when triton is
  installed, else ``"torch"``.

All routes agree up to the dtype's tolerance. :func:`reweight_attention_` is VAR's rule in place
on weights a caller already holds.
"""

from __future__ import annotations

import torch

from .reference import (
    IMAGE,
    IMAGE_SINK,
    TEXT,
    TEXT_SINK,
    VAR,
    Export,
    PreSoftmax,
    check_inputs,
    edited_attention,
    key_groups,
    reweight_attention_,
    visible_keys,
)

IMPLS = ("auto", "triton", "torch")


def route(t: torch.Tensor, impl: str = "auto") -> str:
    """Which implementation serves ``t`` under the dispatch ``impl`` (``"auto"``, ``"triton"``
    or ``"torch"``, as an edit plan carries it): the one rule for every caller.

    - ``"triton"``: the fused kernel, when forced, or under ``"auto"`` for CUDA attention inputs
      (B, H, T, D) in fp16/bf16/fp32 with D <= 256 when triton is installed;
    - ``"cpu"``: the compiled numba loops (:mod:`.cpu`, VAR's per-layer work), under ``"auto"``
      for float32 CPU tensors when numba is installed;
    - ``"torch"``: the torch route (the reference, or SDPA without edits) otherwise.
    """
    if impl == "triton":
        return "triton"
    if impl != "auto":
        return "torch"
    if t.is_cuda:
        if (t.dtype in (torch.float16, torch.bfloat16, torch.float32) and t.dim() == 4
                and t.shape[-1] <= 256):
            from .triton_attention import TRITON_AVAILABLE

            if TRITON_AVAILABLE:
                return "triton"
        return "torch"
    from .cpu import NUMBA_AVAILABLE

    return "cpu" if NUMBA_AVAILABLE and t.dtype == torch.float32 else "torch"


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   scaling: float | None = None, key_padding: torch.Tensor | None = None,
                   causal: bool = True) -> torch.Tensor:
    """Unedited attention through PyTorch SDPA with the reference's masking; (B, Tq, H, D).

    Query rows that see no key give zeros, as in the reference.
    """
    c = check_inputs(q, k, v, scaling=scaling, key_padding=key_padding, pre_softmax=None,
                     var=None, export=None)
    gqa = c.H != c.Hkv
    if key_padding is None and (not causal or c.Tq in (1, c.Tk)):
        # the fast paths: no mask tensor (decode sees every key; prefill is square-causal)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal and c.Tq > 1, scale=c.scaling, enable_gqa=gqa)
        return out.transpose(1, 2)
    visible = visible_keys(c.B, c.Tq, c.Tk, key_padding, causal, q.device)  # (B, 1, Tq, Tk)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                           scale=c.scaling, enable_gqa=gqa)
    seen = visible.any(-1).transpose(1, 2)[..., None]  # (B, Tq, 1, 1)
    return torch.where(seen, out.transpose(1, 2), torch.zeros((), dtype=out.dtype,
                                                              device=out.device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float | None = None,
              key_padding: torch.Tensor | None = None, causal: bool = True,
              pre_softmax: PreSoftmax | None = None, var: VAR | None = None,
              export: Export | None = None, impl: str = "auto"
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Edited attention routed to the fused kernel, SDPA or the torch reference (see module)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if route(q, impl) == "triton":
        from .triton_attention import edited_attention_triton

        return edited_attention_triton(q, k, v, scaling=scaling, key_padding=key_padding,
                                       causal=causal, pre_softmax=pre_softmax, var=var,
                                       export=export)
    if pre_softmax is None and var is None and export is None:
        return sdpa_attention(q, k, v, scaling=scaling, key_padding=key_padding,
                              causal=causal), None
    return edited_attention(q, k, v, scaling=scaling, key_padding=key_padding, causal=causal,
                            pre_softmax=pre_softmax, var=var, export=export)


__all__ = [
    "IMAGE", "IMAGE_SINK", "IMPLS", "TEXT", "TEXT_SINK", "VAR", "Export", "PreSoftmax",
    "attention", "edited_attention", "key_groups", "reweight_attention_", "route",
    "sdpa_attention",
]
