"""``vhr``: Vision-aware Head Reinforcement (He et al., arXiv 2412.13949; jinghan1he/VHR).

Once per request, before decoding (``prepare``): one forward of the real input and one of the
text-only input (image removed), batched together, capture every head's attention output (the
input of ``o_proj``) at the last prompt position, the first generation step. Per (layer, head):
``VHD = ||o_image - o_text||_2``; a head whose VHD AND text-only norm both exceed their layer's
mean + std gets VHD 0 (an outlier driven by the text); the heads with VHD above their layer's
median are selected. During decoding the selected heads' outputs at the generating position are
multiplied by ``alpha`` before ``o_proj``, in the paper's layers: layer 1 and the last 14 of
LLaVA-7B's 32, mapped to the model's depth (``round(1 * L / 32)`` and the last
``round(14 * L / 32)``). The selection is fixed after t = 0. ``alpha = 1`` is the baseline.
"""

from __future__ import annotations

import torch

from ..attention import AttentionEdit
from ..capture import last_position_head_outputs as last_position_head_outputs_of
from ..headmath import head_norms, vhd
from ..method import Method, Param, Request
from ..registry import register


def select_heads(vhd: torch.Tensor, text_norm: torch.Tensor) -> torch.Tensor:
    """(..., H) bool: VHD > the layer's median after zeroing text-driven outliers."""
    def high(x: torch.Tensor) -> torch.Tensor:
        return x > x.mean(-1, keepdim=True) + x.std(-1, keepdim=True)

    cleaned = torch.where(high(vhd) & high(text_norm), torch.zeros_like(vhd), vhd)
    return cleaned > cleaned.median(-1, keepdim=True).values


def vhr_layers(n_layers: int) -> list[int]:
    first = round(1 * n_layers / 32)
    last = max(1, round(14 * n_layers / 32))
    return sorted({first, *range(n_layers - last, n_layers)})


def last_position_head_outputs(ctx, requests: list[Request], layers: list[int]
                               ) -> dict[int, torch.Tensor]:
    """Per layer: (n, H, D) attention outputs (o_proj inputs) at each request's last prompt
    position, from one unedited forward of the encoded requests."""
    heads = ctx.adapter.text_config(ctx.model.config).num_attention_heads  # query heads
    batch = ctx.collate([ctx.encode(r) for r in requests])
    with last_position_head_outputs_of(ctx.model, ctx.adapter, layers) as captured:
        with torch.inference_mode():
            ctx.model(**batch, position_ids=ctx.prefill_positions(batch), use_cache=False,
                      logits_to_keep=1)
    return {layer: x.view(x.shape[0], heads, -1) for layer, x in captured.items()}


class VHREdit(AttentionEdit):
    kernel_free = True  # a head scale after attention: any attention route serves

    def __init__(self, layers: list[int]):
        self._layers = set(layers)
        self.order = {layer: i for i, layer in enumerate(layers)}

    def layers(self) -> set[int]:
        return self._layers

    def head_scale(self, layer, plan):
        return plan.data("vhr_scale")[:, self.order[layer]]  # (n, H)


@register
class VHR(Method):
    name = "vhr"
    description = "Vision-aware head reinforcement: amplify the heads most sensitive to the image."
    params = (
        Param("alpha", 2.0, "factor on the selected heads' outputs (1 = off; 4 degenerates)",
              low=0.0, high=10.0),
    )

    def _layers(self, engine) -> list[int]:
        return vhr_layers(len(engine.adapter.decoder_layers(engine.model)))

    def prepare(self, engine, requests):
        if self.args["alpha"] == 1.0:
            return {}
        layers = self._layers(engine)
        text_only = [Request(None, r.prompt, r.system) for r in requests]
        outputs = last_position_head_outputs(engine, list(requests) + text_only, layers)
        n = len(requests)
        scales = []
        for layer in layers:
            image_heads, text_heads = outputs[layer][:n], outputs[layer][n:]
            selected = select_heads(vhd(image_heads, text_heads), head_norms(text_heads))
            scales.append(torch.where(selected, self.args["alpha"], 1.0))
        return {"vhr_scale": torch.stack(scales, dim=1)}  # (n, layers, H)

    def attention_edits(self, engine):
        return [] if self.args["alpha"] == 1.0 else [VHREdit(self._layers(engine))]
