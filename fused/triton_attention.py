"""Fused edited attention in Triton (forward only): the contract of ``reference.edited_attention``.

One kernel, one pass over the keys with an online softmax. A program owns ``BLOCK_M`` query rows
of one (batch, head); per key block it computes the logits, applies the pre-softmax edit
``a + alpha[h] * keys[b, j] * |a|`` on the selected rows, masks (bounds, left padding, causal with
queries aligned to the end of the keys) and accumulates, besides the usual ``Z`` and ``O``, the
per-group masses ``Z_G`` and the group outputs VAR needs (``O_IMAGE`` and, unless every text
token is scaled, ``O_SINK``). VAR's selection reads the ``Z_G`` after the pass (and the batch
row's epsilon, ``reference.image_eps``, from the launcher) and the output is
``(O + (p - 1) O_scaled + (f_IMAGE - 1) O_IMAGE) / Z``: no attention matrix is formed. Key blocks
that hold no image (or no sink) key skip the extra product, and blocks made only of non-sink image
keys reuse the main one, so VAR costs little beyond the plain kernel. Exported rows (OPERA) are
recomputed over the key window in a second loop, only by programs that own one, with the final
max, mass and VAR factors.

``edited_attention_triton`` is the host launcher: it validates (ValueError naming the argument),
picks block sizes and launches. Inputs are CUDA tensors in fp16/bf16/fp32, or CPU tensors when
``TRITON_INTERPRET=1`` was set before this module was imported (the interpreter has no bf16).
Importing this module never requires triton: ``TRITON_AVAILABLE`` says whether it is there.
"""

from __future__ import annotations

import os

import torch

from .reference import VAR, Export, PreSoftmax, check_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the torch reference serves
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if TRITON_AVAILABLE:

    @triton.jit
    def _edited_attention_kernel(
        Q, K, V, Out, Probs,
        Pad, PreRows, PreKeys, Alpha, Groups, VarRows, VarHeads, VarEps, ExportIdx,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_pb, stride_ph, stride_pr, stride_pn,
        H, Q_LEN, KV_LEN, HEAD_GROUP, qk_scale,
        var_p, var_rho, var_summ, win_start, win_end,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_PRE: tl.constexpr,
        HAS_VAR: tl.constexpr, SCALE_TEXT: tl.constexpr, EXPORT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        b = (off_bh // H).to(tl.int64)  # 64-bit offsets: batch strides can pass 2**31
        h = (off_bh % H).to(tl.int64)
        kvh = h // HEAD_GROUP

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Q_LEN
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        qpos = KV_LEN - Q_LEN + offs_m  # queries sit at the end of the keys
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh

        # pre-softmax coefficient per row: alpha[h] on selected rows, 0 elsewhere
        pre_row = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_PRE:
            sel = tl.load(PreRows + b * Q_LEN + offs_m, mask=m_ok, other=0)
            pre_row = tl.where(sel != 0, tl.load(Alpha + h), 0.0)
        var_row = offs_m < 0
        if HAS_VAR:
            var_row = (tl.load(VarRows + b * Q_LEN + offs_m, mask=m_ok, other=0) != 0) & (
                tl.load(VarHeads + h) != 0)
        var_any = tl.max(var_row.to(tl.int32), axis=0) > 0

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        z_img = tl.zeros([BLOCK_M], dtype=tl.float32)  # Z of non-sink image keys
        z_isink = tl.zeros([BLOCK_M], dtype=tl.float32)  # Z of image sinks
        z_tsink = tl.zeros([BLOCK_M], dtype=tl.float32)  # Z of text sinks
        acc_img = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # O of non-sink image keys
        acc_sink = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # O of sinks (both kinds)

        hi = KV_LEN
        if CAUSAL:
            hi = tl.minimum(KV_LEN, KV_LEN - Q_LEN + (start_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < KV_LEN
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # log2 units
            if HAS_PRE:
                kw = tl.load(PreKeys + b * KV_LEN + offs_n, mask=n_ok, other=0.0)
                s = s + (pre_row[:, None] * kw[None, :]) * tl.abs(s)  # scale > 0: same edit
            ok = n_ok[None, :] & m_ok[:, None]
            if HAS_PAD:
                ok = ok & (tl.load(Pad + b * KV_LEN + offs_n, mask=n_ok, other=1) == 0)[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= qpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            corr = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * corr + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            acc = acc * corr[:, None] + pv
            if HAS_VAR:
                if var_any:
                    g = tl.load(Groups + b * KV_LEN + offs_n, mask=n_ok, other=0)
                    is_img = (g == 2)[None, :]
                    is_isink = (g == 3)[None, :]
                    is_sink = ((g == 1) | (g == 3))[None, :]
                    z_img = z_img * corr + tl.sum(tl.where(is_img, p, 0.0), axis=1)
                    z_isink = z_isink * corr + tl.sum(tl.where(is_isink, p, 0.0), axis=1)
                    z_tsink = z_tsink * corr + tl.sum(tl.where((g == 1)[None, :], p, 0.0), axis=1)
                    n_img = tl.sum((g == 2).to(tl.int32), axis=0)
                    acc_img = acc_img * corr[:, None]
                    if n_img == BLOCK_N:  # only non-sink image keys: the main product
                        acc_img = acc_img + pv
                    elif n_img > 0:
                        p_img = tl.where(is_img, p, 0.0).to(v.dtype)
                        acc_img = acc_img + tl.dot(p_img, v, input_precision=DOT_PRECISION)
                    if not SCALE_TEXT:
                        acc_sink = acc_sink * corr[:, None]
                        if tl.sum(((g == 1) | (g == 3)).to(tl.int32), axis=0) > 0:
                            p_sink = tl.where(is_sink, p, 0.0).to(v.dtype)
                            acc_sink = acc_sink + tl.dot(p_sink, v, input_precision=DOT_PRECISION)
            m_i = m_new

        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        f_scaled = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        f_img = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if HAS_VAR:
            image = z_img + z_isink
            eps = tl.load(VarEps + b) * l_i  # VAR_EPS per image key, in this row's mass units
            centric = var_row & (z_img > 0) & (z_isink <= var_rho * (image + eps)) & (
                image >= var_summ * l_i)
            if SCALE_TEXT:
                z_scaled = l_i - z_img  # text, text sinks and image sinks
                acc_sink = acc - acc_img
            else:
                z_scaled = z_tsink + z_isink
            f_scaled = tl.where(centric, var_p, 1.0)
            f_img = tl.where(centric,
                             1.0 + (1.0 - var_p) * z_scaled / tl.where(z_img > 0, z_img, 1.0), 1.0)
            acc = acc + (f_scaled - 1.0)[:, None] * acc_sink + (f_img - 1.0)[:, None] * acc_img
        out = acc * inv_l[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                 + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])

        if EXPORT:
            r_idx = tl.load(ExportIdx + b * Q_LEN + offs_m, mask=m_ok, other=-1)
            if tl.max(r_idx, axis=0) >= 0:
                m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
                p_base = Probs + b * stride_pb + h * stride_ph + r_idx[:, None] * stride_pr
                for start_n in range(win_start, win_end, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    n_ok = offs_n < win_end
                    k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                                mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
                    if HAS_PRE:
                        kw = tl.load(PreKeys + b * KV_LEN + offs_n, mask=n_ok, other=0.0)
                        s = s + (pre_row[:, None] * kw[None, :]) * tl.abs(s)
                    ok = n_ok[None, :] & m_ok[:, None]
                    if HAS_PAD:
                        pad = tl.load(Pad + b * KV_LEN + offs_n, mask=n_ok, other=1)
                        ok = ok & (pad == 0)[None, :]
                    if CAUSAL:
                        ok = ok & (offs_n[None, :] <= qpos[:, None])
                    p = tl.where(ok, tl.exp2(s - m_fin[:, None]), 0.0) * inv_l[:, None]
                    if HAS_VAR:
                        g = tl.load(Groups + b * KV_LEN + offs_n, mask=n_ok, other=0)
                        scaled = (g == 1) | (g == 3)
                        if SCALE_TEXT:
                            scaled = scaled | (g == 0)
                        factor = tl.where((g == 2)[None, :], f_img[:, None],
                                          tl.where(scaled[None, :], f_scaled[:, None], 1.0))
                        p = p * factor
                    tl.store(p_base + (offs_n - win_start)[None, :] * stride_pn, p,
                             mask=(r_idx >= 0)[:, None] & n_ok[None, :])


def _check_block(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")


def edited_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            scaling: float | None = None, key_padding: torch.Tensor | None = None,
                            causal: bool = True, pre_softmax: PreSoftmax | None = None,
                            var: VAR | None = None, export: Export | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused kernel; same arguments and result as ``reference.edited_attention``.

    ``block_m``/``block_n`` (powers of two >= 16), ``num_warps`` and ``num_stages`` override the
    launch heuristics (tests use small key blocks to put group boundaries across blocks).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed: install the 'gpu' extra "
                           "(pip install 'veridical[gpu]') or use impl='torch'")
    c = check_inputs(q, k, v, scaling=scaling, key_padding=key_padding, pre_softmax=pre_softmax,
                     var=var, export=export, check_values=False)
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be one of float16, bfloat16, float32, got {q.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"q is on {q.device}: the Triton kernel needs CUDA tensors (or "
                         "TRITON_INTERPRET=1 set before importing this module, for tests)")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("q is bfloat16, which the Triton interpreter does not support: use "
                         "float16/float32 on CPU, bfloat16 on a GPU")
    if c.D > 256:
        raise ValueError(f"head_dim must be <= 256 for the fused kernel, got {c.D}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

    # Launch heuristics (untuned: no GPU has timed them yet). Decode: one 16-row tile (tl.dot's
    # minimum) streaming wide key blocks; prefill: the tutorial's 128-row tiles, 64 rows when
    # VAR's two extra (BLOCK_M, D) fp32 accumulators must fit in registers.
    decode = c.Tq <= 16
    if block_m is None:
        block_m = 16 if decode else (64 if var is not None or c.D > 128 else 128)
    if block_n is None:
        block_n = 32 if c.D > 128 else (128 if decode else 64)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if num_warps is None:
        num_warps = 4 if decode or (block_m <= 64 and c.D <= 64) else 8
    if num_stages is None:
        num_stages = 2 if var is not None else 3

    B, H, Tq, Tk, D = c.B, c.H, c.Tq, c.Tk, c.D
    dev = q.device
    out = torch.empty(B, Tq, H, D, device=dev, dtype=q.dtype)
    dummy = torch.empty(1, device=dev, dtype=torch.int32)  # for pointers the kernel never reads

    def u8(t: torch.Tensor | None) -> torch.Tensor:
        return dummy if t is None else t.contiguous().view(torch.uint8)

    pad = u8(key_padding)
    pre_rows = u8(c.pre_rows)
    pre_keys = dummy if c.pre_keys is None else c.pre_keys.contiguous()
    alpha = dummy if c.alpha is None else c.alpha.contiguous()
    groups = dummy if var is None else var.groups.contiguous()
    var_eps = dummy if var is None else c.var_eps
    var_rows, var_heads = u8(c.var_rows), u8(c.var_heads)
    if export is not None:
        probs = torch.empty(B, H, c.n_export, export.end - export.start, device=dev,
                            dtype=torch.float32)
        export_idx = c.export_index.contiguous()
        win = (export.start, export.end)
    else:
        probs, export_idx, win = torch.empty(1, 1, 1, 1, device=dev), dummy, (0, 0)

    grid = (triton.cdiv(Tq, block_m), B * H)
    _edited_attention_kernel[grid](
        q, k, v, out, probs,
        pad, pre_rows, pre_keys, alpha, groups, var_rows, var_heads, var_eps, export_idx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *probs.stride(),
        H, Tq, Tk, H // c.Hkv, c.scaling * LOG2E,
        float(var.p) if var else 0.0, float(var.rho) if var else 0.0,
        float(var.summ) if var else 0.0, win[0], win[1],
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=bool(causal), HAS_PAD=key_padding is not None, HAS_PRE=pre_softmax is not None,
        HAS_VAR=var is not None, SCALE_TEXT=bool(var is not None and var.scale_text),
        EXPORT=export is not None,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32: ~fp32 accuracy
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, (probs if export is not None else None)


__all__ = ["TRITON_AVAILABLE", "edited_attention_triton"]
