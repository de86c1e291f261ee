"""Token choice for one step: pure functions over (N, V) score tensors.

``warp`` applies temperature, top-k and top-p in the order transformers applies them, so a
warped distribution equals the one ``model.generate`` samples from. ``sample`` draws one token per
row from its own ``torch.Generator``: a request's draws depend only on its seed and its own
scores, never on the other rows of the batch.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Return warped copies of ``scores`` (N, V); filtered tokens get -inf."""
    out = scores / temperature if temperature != 1.0 else scores.clone()
    if top_k > 0:
        k = min(top_k, out.shape[-1])
        kth = torch.topk(out, k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, NEG_INF)
    if top_p < 1.0:
        # As transformers: drop the low tail whose cumulative probability is <= 1 - top_p,
        # always keeping the most likely token.
        sorted_scores, order = torch.sort(out, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, NEG_INF)
    return out


def sample(scores: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``scores`` (N, V) by inverse-CDF sampling with row i's generator."""
    probs = scores.double().softmax(dim=-1)  # (N, V); float64 keeps the CDF stable across batches
    cdf = probs.cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    uniforms = uniforms.to(cdf.device) * cdf[:, -1]
    # right=True: the first index whose CDF exceeds u, which never is a zero-probability token...
    tokens = torch.searchsorted(cdf, uniforms[:, None], right=True).squeeze(-1)
    # ...except past the end when rounding makes u equal the total.
    return torch.minimum(tokens, (probs > 0).cumsum(-1).argmax(-1))
