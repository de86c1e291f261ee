"""Edited attention in plain torch: the specification the fused Triton kernel must reproduce.

Contract of :func:`edited_attention` (all math in fp32, whatever the input dtype):

- Layout as transformers' attention functions: ``q`` (B, H, Tq, D), ``k``/``v`` (B, Hkv, Tk, D)
  with ``H % Hkv == 0`` (GQA: query head ``h`` reads key/value head ``h // (H // Hkv)``). Returns
  ``(out, probs)``: ``out`` (B, Tq, H, D) in the input dtype; ``probs`` the exported rows or None.
- Logits ``a = (q . k) * scaling`` (``scaling`` defaults to ``D ** -0.5``).
- Visible keys: ``key_padding`` (B, Tk) bool is True at PADDING keys (left padding), which are never
  attended. ``causal=True`` aligns the query positions to the END of the keys: query ``i`` sits
  at position ``Tk - Tq + i`` and sees keys ``j <= Tk - Tq + i`` (decode Tq=1 and prefill Tq=Tk
  alike). A query row that sees no key outputs zeros (and exports zeros).
- :class:`PreSoftmax` (PAI, FIA): ``a <- a + c * |a|`` with ``c = alpha[h] * keys[b, j]`` on the
  selected query rows, before masking and softmax. ``alpha`` is a scalar or per head (H,), 0 for
  heads left alone; ``keys`` (B, Tk) is a bool mask (image columns) or float multipliers per key
  (FIA: alpha on its top tokens, beta on its bottom ones, in one call).
- :class:`VAR`: every key carries a group id (B, Tk) int8: ``TEXT``, ``TEXT_SINK``, ``IMAGE``
  (non-sink image token), ``IMAGE_SINK``. For one (head, query row) let ``Z_G`` be the softmax
  mass of group G (``Z_G = sum_{j in G} exp(a_j - m)``) and ``O_G = sum_{j in G} exp(a_j - m) v_j``.
  The row is image-centric when it is selected (``rows`` and ``heads``), ``Z_IMAGE > 0``,
  ``Z_IMAGE_SINK / (Z_IMAGE + Z_IMAGE_SINK + n_image * VAR_EPS * Z) <= rho`` (sink share of its
  image attention; ``n_image`` counts the batch row's image keys, sinks included, and
  ``VAR_EPS`` is added per image key as the official code's ``sum(image_attn + 1e-6)`` does) and
  ``(Z_IMAGE + Z_IMAGE_SINK) / Z >= summ`` (image attention). There the sink weights (text sinks
  and image sinks; plus every text token when ``scale_text``) are multiplied by ``p`` and the
  removed mass ``(1 - p) * (their sum)`` is added to the non-sink image tokens in proportion to
  their weights, so the row still sums to 1. As the output is linear in the weights this is
  ``out = sum_G f_G O_G / Z`` with ``f = p`` on scaled groups and
  ``f_IMAGE = 1 + (1 - p) * Z_scaled / Z_IMAGE``: one pass, no attention matrix needed.
  ``scale_text=False`` follows the official code (seilk/VisAttnSink ``src/logic/logic.py``
  scales only sink tokens: its ``text_indices`` are the sinks outside the image); ``True`` is
  the reading "text and sink weights *= p" (every text key scaled). Its ``p`` is the kept
  fraction and ``rho`` the sink-share bound, i.e. 1 minus the paper's symbols. That code edits
  nothing in a layer where no image token is a sink; callers express that, and VAR's prefill
  rows (text queries after the image), through ``rows``. :func:`key_groups` builds the ids from
  image and sink masks.
- :class:`Export` (OPERA): the post-softmax probabilities, after every edit (the weights ``out``
  is made of), of the chosen query rows over the key window ``[start, end)``, fp32
  (B, H, n_rows, end - start). Every batch row must choose the same number of query rows.

:func:`reweight_attention_` applies VAR's rule in place to weights that are already materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT, TEXT_SINK, IMAGE, IMAGE_SINK = 0, 1, 2, 3
N_GROUPS = 4
# VAR's epsilon, added to the normalised image attention once PER IMAGE KEY in the sink share's
# denominator, as the official code's ``sum(image_attn + 1e-6)``; every route uses this value
VAR_EPS = 1e-6


def key_groups(image: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """(B, Tk) int8 group ids from the image-key and sink-key masks (B, Tk) bool."""
    if image.dtype != torch.bool or sink.dtype != torch.bool or image.shape != sink.shape:
        raise ValueError(f"image and sink must be bool masks of one shape (B, Tk), got "
                         f"{image.dtype} {tuple(image.shape)} and {sink.dtype} {tuple(sink.shape)}")
    return (image.to(torch.int8) * IMAGE + sink.to(torch.int8)).to(torch.int8)


def image_eps(groups: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) ``VAR_EPS`` times the number of image keys (sinks included) of each row of the
    (B, Tk) group ids: the epsilon of VAR's sink share, in units of the row's mass."""
    return (groups >= IMAGE).sum(-1).to(dtype) * VAR_EPS


@dataclass(frozen=True)
class PreSoftmax:
    """``a + alpha[h] * keys[b, j] * |a|`` on query rows ``rows`` (None: every row)."""

    alpha: float | torch.Tensor  # scalar or (H,)
    keys: torch.Tensor  # (B, Tk) bool mask or float multipliers
    rows: torch.Tensor | None = None  # (B, Tq) bool


@dataclass(frozen=True)
class VAR:
    """VAR's post-softmax redistribution; defaults are the official code's (p kept, rho, summ)."""

    groups: torch.Tensor  # (B, Tk) int8: TEXT, TEXT_SINK, IMAGE, IMAGE_SINK
    rows: torch.Tensor | None = None  # (B, Tq) bool; None: every row
    heads: torch.Tensor | None = None  # (H,) bool; None: every head
    p: float = 0.6
    rho: float = 0.5
    summ: float = 0.2
    scale_text: bool = False


@dataclass(frozen=True)
class Export:
    """Post-softmax probability rows of query rows ``rows`` over keys ``[start, end)``."""

    rows: torch.Tensor  # (B, Tq) bool, the same count in every batch row
    start: int
    end: int


@dataclass(frozen=True)
class Checked:
    """Validated inputs with defaults filled in (shared by the reference and the launcher)."""

    B: int
    H: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    scaling: float
    alpha: torch.Tensor | None  # (H,) fp32
    pre_keys: torch.Tensor | None  # (B, Tk) fp32
    pre_rows: torch.Tensor | None  # (B, Tq) bool
    var_rows: torch.Tensor | None  # (B, Tq) bool
    var_heads: torch.Tensor | None  # (H,) bool
    var_eps: torch.Tensor | None  # (B,) fp32: image_eps(groups)
    export_index: torch.Tensor | None  # (B, Tq) int32: output row of each query row, -1 if none
    n_export: int


def _mask(name: str, t: torch.Tensor | None, shape: tuple[int, ...], device) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor of shape {shape}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (batch, positions), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: move it to q's device")
    return t


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float | None,
                 key_padding: torch.Tensor | None, pre_softmax: PreSoftmax | None,
                 var: VAR | None, export: Export | None, check_values: bool = True) -> Checked:
    """Validate shapes, dtypes and parameters; raise ``ValueError`` naming the argument.

    ``check_values=False`` skips the checks that read tensor values (group ids), which would
    force a host synchronisation on a GPU.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (batch, heads, positions, head_dim), "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must both have shape (B={B}, Hkv, Tk, D={D}), got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"the key/value heads ({Hkv}) must divide the query heads ({H}) (GQA)")
    if Tq > Tk:
        raise ValueError(f"q has more positions ({Tq}) than k ({Tk}): queries are aligned to the "
                         "end of the keys (decode Tq=1, prefill Tq=Tk)")
    if scaling is None:
        scaling = D ** -0.5
    elif not isinstance(scaling, (int, float)) or not scaling > 0:
        raise ValueError(f"scaling must be a positive float, got {scaling!r}")
    dev = q.device
    _mask("key_padding", key_padding, (B, Tk), dev)

    alpha = pre_keys = pre_rows = None
    if pre_softmax is not None:
        a = pre_softmax.alpha
        if isinstance(a, torch.Tensor):
            if a.dim() == 0:
                a = a.reshape(1).expand(H)
            if tuple(a.shape) != (H,) or not a.is_floating_point():
                raise ValueError(f"pre_softmax.alpha must be a float or a float tensor of shape "
                                 f"(H={H},), got {a.dtype} {tuple(a.shape)}")
            alpha = a.to(device=dev, dtype=torch.float32)
        elif isinstance(a, (int, float)):
            alpha = torch.full((H,), float(a), device=dev, dtype=torch.float32)
        else:
            raise ValueError(f"pre_softmax.alpha must be a float or an (H,) tensor, got {a!r}")
        keys = pre_softmax.keys
        if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (B, Tk):
            raise ValueError(f"pre_softmax.keys must be a (B={B}, Tk={Tk}) bool mask or float "
                             f"tensor, got {getattr(keys, 'shape', type(keys).__name__)}")
        if keys.dtype != torch.bool and not keys.is_floating_point():
            raise ValueError(f"pre_softmax.keys must be bool or floating point, got {keys.dtype}")
        if keys.device != dev:
            raise ValueError(f"pre_softmax.keys is on {keys.device}, q on {dev}")
        pre_keys = keys.to(torch.float32)
        pre_rows = _mask("pre_softmax.rows", pre_softmax.rows, (B, Tq), dev)
        if pre_rows is None:
            pre_rows = torch.ones(B, Tq, dtype=torch.bool, device=dev)

    var_rows = var_heads = var_eps = None
    if var is not None:
        g = var.groups
        if not isinstance(g, torch.Tensor) or g.dtype != torch.int8 or tuple(g.shape) != (B, Tk):
            raise ValueError(f"var.groups must be an int8 tensor of shape (B={B}, Tk={Tk}) with "
                             "ids TEXT=0, TEXT_SINK=1, IMAGE=2, IMAGE_SINK=3, got "
                             f"{getattr(g, 'dtype', type(g).__name__)} "
                             f"{tuple(getattr(g, 'shape', ()))}")
        if g.device != dev:
            raise ValueError(f"var.groups is on {g.device}, q on {dev}")
        if check_values and g.numel() and (int(g.min()) < 0 or int(g.max()) >= N_GROUPS):
            raise ValueError(f"var.groups ids must lie in 0..{N_GROUPS - 1} (TEXT, TEXT_SINK, "
                             f"IMAGE, IMAGE_SINK), got {int(g.min())}..{int(g.max())}")
        for name in ("p", "rho", "summ"):
            value = getattr(var, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"var.{name} must be a float in [0, 1], got {value!r}")
        var_rows = _mask("var.rows", var.rows, (B, Tq), dev)
        if var_rows is None:
            var_rows = torch.ones(B, Tq, dtype=torch.bool, device=dev)
        var_heads = _mask("var.heads", var.heads, (H,), dev)
        if var_heads is None:
            var_heads = torch.ones(H, dtype=torch.bool, device=dev)
        var_eps = image_eps(g)

    export_index, n_export = None, 0
    if export is not None:
        rows = _mask("export.rows", export.rows, (B, Tq), dev)
        if rows is None:
            raise ValueError("export.rows must be a (B, Tq) bool tensor, got None")
        if not (isinstance(export.start, int) and isinstance(export.end, int)
                and 0 <= export.start < export.end <= Tk):
            raise ValueError(f"export window [start, end) must satisfy 0 <= start < end <= Tk={Tk},"
                             f" got [{export.start!r}, {export.end!r})")
        counts = rows.sum(dim=1)
        n_export = int(counts[0]) if B else 0
        if B and bool((counts != n_export).any()):
            raise ValueError("export.rows must choose the same number of query rows in every batch "
                             f"row, got {counts.tolist()}")
        export_index = torch.where(rows, rows.to(torch.int32).cumsum(1, dtype=torch.int32) - 1,
                                   torch.full_like(rows, -1, dtype=torch.int32))
    return Checked(B, H, Hkv, Tq, Tk, D, float(scaling), alpha, pre_keys, pre_rows, var_rows,
                   var_heads, var_eps, export_index, n_export)


def visible_keys(B: int, Tq: int, Tk: int, key_padding: torch.Tensor | None, causal: bool,
                 device) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: which keys each query row may attend."""
    visible = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        qpos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
        visible = visible & (torch.arange(Tk, device=device)[None, :] <= qpos)
    if key_padding is not None:
        visible = visible & ~key_padding[:, None, None, :]
    return visible


def var_factors(z: torch.Tensor, zg: torch.Tensor, selected: torch.Tensor, eps: torch.Tensor,
                var: VAR) -> torch.Tensor:
    """Per-group weight factors (..., 4) of VAR from the row mass ``z`` (...), the group
    masses ``zg`` (..., 4) and the share's epsilon ``eps`` (broadcast to ``z``, from
    :func:`image_eps`); rows outside ``selected`` (...) bool keep factor 1."""
    z_img, z_isink = zg[..., IMAGE], zg[..., IMAGE_SINK]
    image = z_img + z_isink
    share = z_isink / (image + eps * z).clamp_min(torch.finfo(image.dtype).tiny)
    centric = selected & (z_img > 0) & (share <= var.rho) & (image >= var.summ * z)
    scaled = [TEXT_SINK, IMAGE_SINK] + ([TEXT] if var.scale_text else [])
    z_scaled = zg[..., scaled].sum(-1)
    f_image = 1.0 + (1.0 - var.p) * z_scaled / z_img.clamp_min(torch.finfo(z_img.dtype).tiny)
    f = torch.ones_like(zg)
    f[..., scaled] = torch.where(centric[..., None], var.p, 1.0)
    f[..., IMAGE] = torch.where(centric, f_image, 1.0)
    return f


def edited_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     scaling: float | None = None, key_padding: torch.Tensor | None = None,
                     causal: bool = True, pre_softmax: PreSoftmax | None = None,
                     var: VAR | None = None, export: Export | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with the edits of the module docstring; ``(out (B, Tq, H, D), probs | None)``."""
    c = check_inputs(q, k, v, scaling=scaling, key_padding=key_padding, pre_softmax=pre_softmax,
                     var=var, export=export)
    rep = c.H // c.Hkv
    qf = q.float()
    kf = k.float().repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    vf = v.float().repeat_interleave(rep, dim=1)
    a = torch.matmul(qf, kf.transpose(-1, -2)) * c.scaling  # (B, H, Tq, Tk)
    if pre_softmax is not None:
        coef = (c.alpha[None, :, None, None] * c.pre_keys[:, None, None, :]
                * c.pre_rows[:, None, :, None])  # (B, H, Tq, Tk)
        a = a + coef * a.abs()
    visible = visible_keys(c.B, c.Tq, c.Tk, key_padding, causal, q.device)
    a = a.masked_fill(~visible, float("-inf"))
    m = a.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see no key
    e = torch.exp(a - m)  # (B, H, Tq, Tk), 0 where not visible
    z = e.sum(dim=-1)  # (B, H, Tq)
    inv_z = torch.where(z > 0, 1.0 / z.clamp_min(torch.finfo(z.dtype).tiny), torch.zeros_like(z))
    if var is None:
        out = torch.matmul(e, vf) * inv_z[..., None]
        weight = None
    else:
        member = torch.stack([var.groups == g for g in range(N_GROUPS)], -1).float()  # (B, Tk, 4)
        zg = torch.matmul(e, member[:, None])  # (B, H, Tq, 4): Z_G
        og = torch.stack([torch.matmul(e * member[:, None, None, :, g], vf)
                          for g in range(N_GROUPS)], dim=-2)  # (B, H, Tq, 4, D): O_G
        selected = c.var_rows[:, None, :] & c.var_heads[None, :, None]  # (B, H, Tq)
        f = var_factors(z, zg, selected, c.var_eps[:, None, None], var)  # (B, H, Tq, 4)
        out = (f[..., None] * og).sum(-2) * inv_z[..., None]
        weight = torch.matmul(f, member[:, None].transpose(-1, -2))  # (B, H, Tq, Tk): f of each key
    probs = None
    if export is not None:
        p = e * inv_z[..., None]
        if weight is not None:
            p = p * weight
        b_idx, q_idx = export.rows.nonzero(as_tuple=True)  # row-major: query order per batch
        rows = p[b_idx, :, q_idx, export.start:export.end]  # (B * n, H, W)
        probs = rows.reshape(c.B, c.n_export, c.H, -1).transpose(1, 2).contiguous()
    return out.transpose(1, 2).to(q.dtype), probs


def reweight_attention_(weights: torch.Tensor, groups: torch.Tensor, *, p: float = 0.6,
                        rho: float = 0.5, summ: float = 0.2, heads: torch.Tensor | None = None,
                        rows: torch.Tensor | None = None, scale_text: bool = False
                        ) -> torch.Tensor:
    """VAR's rule in place on post-softmax ``weights`` (B, H, Tq, Tk); returns ``weights``.

    ``groups`` (B, Tk) int8 as for :class:`VAR`; ``heads`` (H,) and ``rows`` (B, Tq) bool select
    where the rule may apply (None: everywhere). Written on the weights as the official code
    does (scale the sinks, add the removed mass to non-sink image tokens in proportion), so that
    it checks the grouped form of :func:`edited_attention`.
    """
    if weights.dim() != 4 or not weights.is_floating_point():
        raise ValueError(f"weights must be a float (B, H, Tq, Tk) tensor, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    B, H, Tq, Tk = weights.shape
    if groups.dtype != torch.int8 or tuple(groups.shape) != (B, Tk):
        raise ValueError(f"groups must be an int8 tensor of shape (B={B}, Tk={Tk}), got "
                         f"{groups.dtype} {tuple(groups.shape)}")
    for name, value in (("p", p), ("rho", rho), ("summ", summ)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    heads = _mask("heads", heads, (H,), weights.device)
    rows = _mask("rows", rows, (B, Tq), weights.device)
    g = groups[:, None, None, :]  # (B, 1, 1, Tk)
    image, image_sink = g == IMAGE, g == IMAGE_SINK
    sink = (g == TEXT_SINK) | image_sink | ((g == TEXT) if scale_text else False)
    w = weights.to(torch.promote_types(weights.dtype, torch.float32))
    image_attn = (w * (image | image_sink)).sum(-1)  # (B, H, Tq)
    image_mass = (w * image).sum(-1)
    eps = image_eps(groups, w.dtype)[:, None, None]  # per image key, as the official code
    share = (w * image_sink).sum(-1) / (image_attn + eps).clamp_min(torch.finfo(w.dtype).tiny)
    centric = (image_mass > 0) & (share <= rho) & (image_attn >= summ)
    if heads is not None:
        centric = centric & heads[None, :, None]
    if rows is not None:
        centric = centric & rows[:, None, :]
    budget = (1.0 - p) * (w * sink).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    ratio = w * image / image_mass.clamp_min(torch.finfo(w.dtype).tiny)[..., None]
    edited = torch.where(sink, w * p, w) + budget * ratio
    weights.copy_(torch.where(centric[..., None], edited, w).to(weights.dtype))
    return weights
