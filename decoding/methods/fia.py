"""``fia``: Fixing Imbalanced Attention (hasanar1f/llava-hallunication-fix, ``modPAI``).

Dual-stream token selection, once per request (``prepare``), from the vision tower's attention
of its CLS token to the patches (captured with forward hooks on ``q_proj``/``k_proj``, mean over
heads):
- ``top``: the ``ratio`` (25%) image tokens with the highest CLS attention in ViT layer 0;
- ``bottom``: IQR outliers (``> Q3 + 1.5 IQR``) of the CLS attention in ViT layer -2, removed
  from ``top``.
Edit (through the ``veridical`` attention function): on the pre-softmax logits of the last query
position, layers ``start_layer .. L-1`` (the reference: 2..31 of 32; mapped to depth),
``a += alpha_h * |a|`` on top keys and ``a += beta_h * |a|`` on bottom keys.

Head-specific modulation (the paper's idea; not in the released code, so implemented here from
the paper): ``alpha_h = alpha * m_h`` and ``beta_h = beta * m_h`` with ``m_h`` = the head's
visual sensitivity from the model's head profile (``engine.head_profile``, attached by
``veridical.load``; see ``veridical.heads``) divided by its layer's mean (mean 1, so the layer's
total boost is unchanged while visually sensitive heads get more); ``head_modulation=false``
uses ``m_h = 1``. Optional PAI-style guidance: ``gamma`` (1 = off; the paper's option 2).

Fallback without a head profile (``engine.head_profile`` is None: the model was never profiled;
``veridical heads profile --model REF --data DIR`` makes one): ``head_modulation=true`` uses
uniform modulation, ``m_h = 1``, as ``head_modulation=false`` does, and logs a warning once per
model. A request never builds a profile.

Fallback for vision towers without a CLS token whose patches map one-to-one to image tokens
(Qwen-VL's merged patches, LLaVA-NeXT's tiles and newline tokens): no CLS attention exists, so
every image token counts as ``top`` (the edit becomes PAI's boost with FIA's head modulation),
and this is logged once per model.

The warnings given are remembered in ``WARNED`` (module level): model -> set of warning names,
weakly keyed, so an unloaded model's entry goes with it.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..attention import AttentionEdit, last_row_mask
from ..headmath import head_scores
from ..method import Param
from ..registry import register
from .pai import PAI, boost_logits

logger = logging.getLogger(__name__)
CLS_TOWER_FAMILIES = ("llava",)
WARNED: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def warn_once(engine, name: str, message: str, *args) -> None:
    """Log ``message`` as a warning unless warning ``name`` was given for this model already."""
    given = WARNED.setdefault(engine.model, set())
    if name not in given:
        given.add(name)
        logger.warning(message, *args)


def select_tokens(early: torch.Tensor, late: torch.Tensor, ratio: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, P) CLS->patch attention of an early and a late ViT layer -> (top, bottom) masks."""
    n, patches = early.shape
    k = max(1, round(ratio * patches))
    top = torch.zeros_like(early, dtype=torch.bool)
    top.scatter_(1, early.topk(k, dim=-1).indices, True)
    q1, q3 = torch.quantile(late.float(), torch.tensor([0.25, 0.75]), dim=-1, keepdim=True)
    bottom = late > q3 + 1.5 * (q3 - q1)
    return top & ~bottom, bottom


def fia_factors(sets: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Per-layer, per-head factors (L, n, H, 1, kv) of ``boost_logits``: ``alpha_h`` on top keys,
    ``beta_h`` on bottom keys, 0 elsewhere, from ``sets`` (n, kv, 2) = (top, bottom) as 0/1 and
    ``coefficients`` (L, 2, H) = (alpha_h, beta_h) per layer. The sets are disjoint, so each
    entry is exact."""
    return torch.matmul(sets, coefficients[:, None]).transpose(2, 3)[:, :, :, None, :]


def cls_attention(engine, requests, layers: tuple[int, int]) -> list[torch.Tensor]:
    """Per ViT layer in ``layers``: (n, P) attention of CLS to each patch, mean over heads."""
    tower = engine.model.model.vision_tower
    blocks = tower.encoder.layers
    wanted = [layer % len(blocks) for layer in layers]
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in wanted:
        attn = blocks[layer].self_attn
        for name in ("q_proj", "k_proj"):
            handles.append(getattr(attn, name).register_forward_hook(
                lambda m, a, out, key=(layer, name): captured.__setitem__(key, out.detach())))
    rows = [engine.encode(r) for r in requests]
    pixels = torch.cat([r["pixel_values"] for r in rows]).to(engine.device, engine.model.dtype)
    try:
        with torch.inference_mode():
            tower(pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in wanted:
        attn = blocks[layer].self_attn
        q, k = captured[(layer, "q_proj")], captured[(layer, "k_proj")]  # (n, T, E)
        heads = attn.num_heads
        q = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2).float()
        k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2).float()
        weights = torch.softmax(q[:, :, :1] @ k.transpose(2, 3) * attn.scale, dim=-1)
        out.append(weights[:, :, 0, 1:].mean(1))  # CLS row, patches only, mean over heads
    return out


class FIAEdit(AttentionEdit):
    def __init__(self, layers: range, alpha: float, beta: float, modulation: torch.Tensor):
        self._layers, self.a, self.b, self.modulation = set(layers), alpha, beta, modulation
        self.alpha, self.beta = alpha * modulation, beta * modulation  # (L, H) each
        self.coefficients = torch.stack([self.alpha, self.beta], dim=1)  # (L, 2, H)

    def layers(self) -> set[int]:
        return self._layers

    def _sets(self, plan, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, kv) top and bottom keys of the edited rows: the k-th image key of a row takes
        the k-th entry of its request's selection (once per forward)."""
        return plan.remember("fia_sets", lambda: self._make_sets(plan, device))

    def _make_sets(self, plan, device) -> tuple[torch.Tensor, torch.Tensor]:
        image = plan.keys().to(device)
        rank = (image.cumsum(-1) - 1).clamp_min(0)
        out = []
        for name in ("fia_top", "fia_bottom"):
            chosen = plan.data(name).to(device)
            out.append(torch.gather(chosen, 1, rank.clamp_max(chosen.shape[1] - 1)) & image)
        return out[0], out[1]

    def edit_logits(self, layer, logits, plan):
        factors = plan.remember("fia_factors", lambda: fia_factors(  # every layer's, once
            torch.stack(self._sets(plan, logits.device), dim=-1).to(logits.dtype),
            self.coefficients.to(logits.device, logits.dtype)))
        return boost_logits(logits, factors[layer])

    def kernel_args(self, layer, inputs, plan):
        # alpha_h * top + beta_h * bottom = m_h * (alpha * top + beta * bottom)
        from veridical.kernels import PreSoftmax

        q = inputs.query
        top, bottom = self._sets(plan, q.device)
        keys = torch.zeros(q.shape[0], top.shape[1], device=q.device)
        keys[plan.index.to(q.device)] = self.a * top.float() + self.b * bottom.float()
        rows = last_row_mask(plan, q.shape[0], q.shape[2], q.device)
        return {"pre_softmax": PreSoftmax(alpha=self.modulation[layer].to(q.device), keys=keys,
                                          rows=rows)}


@register
class FIA(PAI):
    name = "fia"
    description = "Fixing imbalanced attention: boost CLS-salient image tokens, per-head."
    params = (
        Param("alpha", 0.7, "boost on the top image tokens (0 = off)", low=0.0, high=10.0),
        Param("beta", 0.3, "boost on the bottom (outlier) image tokens", low=0.0, high=10.0),
        Param("ratio", 0.25, "share of image tokens in the top set", low=0.0, high=1.0,
              low_open=True),
        Param("gamma", 1.0, "optional PAI-style guidance scale (1 = off; the paper's option 2)",
              low=1.0, high=100.0),
        Param("beta_apc", 0.1, "APC of the guidance (with gamma > 1)", low=0.0, high=1.0),
        Param("head_modulation", True, "scale each head's boost by its visual sensitivity",
              type=bool),
        Param("start_layer", -1, "first edited layer (-1: the paper's 2 of 32, scaled)",
              type=int, low=-1),
    )

    def plausibility(self):
        return self.args["beta_apc"] if self.args["gamma"] != 1.0 else None

    def _off(self) -> bool:
        return self.args["alpha"] == 0 and self.args["beta"] == 0

    def prepare(self, engine, requests):
        if self._off():
            return {}
        with_image = [r for r in requests if r.image is not None]
        if engine.adapter.family not in CLS_TOWER_FAMILIES or not with_image:
            if engine.adapter.family not in CLS_TOWER_FAMILIES:
                warn_once(engine, "no_cls", "fia: %s's vision tower has no CLS token mapped "
                          "one-to-one to image tokens; every image token counts as top",
                          engine.name)
            ones = torch.ones(len(requests), 1, dtype=torch.bool)
            return {"fia_top": ones, "fia_bottom": ~ones}
        early, late = cls_attention(engine, with_image, (0, -2))
        top, bottom = select_tokens(early, late, self.args["ratio"])
        full_top = torch.zeros(len(requests), top.shape[1], dtype=torch.bool)
        full_bottom = torch.zeros_like(full_top)
        positions = [i for i, r in enumerate(requests) if r.image is not None]
        full_top[positions], full_bottom[positions] = top.cpu(), bottom.cpu()
        return {"fia_top": full_top, "fia_bottom": full_bottom}

    def attention_edits(self, engine):
        if self._off():
            return []
        layers = self.edited_layers(engine)
        return [FIAEdit(layers, self.args["alpha"], self.args["beta"],
                        self._modulation(engine, layers.stop))]

    def _modulation(self, engine, n_layers: int) -> torch.Tensor:
        heads = engine.adapter.text_config(engine.model.config).num_attention_heads
        if not self.args["head_modulation"]:
            return torch.ones(n_layers, heads)
        if engine.head_profile is None:
            warn_once(engine, "no_profile", "fia: %s has no head profile, so head_modulation "
                      "uses uniform modulation (every head 1); run `veridical heads profile "
                      "--model REF --data DIR` to profile it", engine.name)
            return torch.ones(n_layers, heads)
        return head_modulation(head_scores(engine.head_profile, "visual_sensitivity"))


def head_modulation(sensitivity: torch.Tensor) -> torch.Tensor:
    """(L, H) factors: each head's visual sensitivity over its layer's mean (mean 1 per layer;
    a layer with no sensitivity at all gets 1 everywhere)."""
    mean = sensitivity.mean(-1, keepdim=True)
    return torch.where(mean > 0, sensitivity / mean.clamp_min(1e-12), torch.ones_like(sensitivity))
