"""Weak MoE routing for selected rows of a batch, through forward hooks on the routers.

transformers' MoE routers (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``,
``Qwen3VLMoeTextTopKRouter``, ...) return ``(router_logits, routing_weights, expert_indices)``
for the flattened tokens ``(rows * seq_len, ...)``. The hook rewrites, for the tokens of the
flagged rows only, the indices to the token's ``rank``-th ranked expert and the weights to
``[1, 0, ...]`` (the extra slots repeat that expert with weight 0, which contributes nothing), so
strong and weak rows share one forward. No transformers internals are patched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from veridical.errors import InputError


def weak_routing(output: tuple, rows: torch.Tensor, rank: int) -> tuple:
    """The router ``output`` with the tokens of ``rows`` (R,) routed to their rank-th expert."""
    logits, weights, indices = output[:3]
    n_rows = rows.shape[0]
    if logits.shape[0] % n_rows:
        raise RuntimeError(f"router saw {logits.shape[0]} tokens for {n_rows} rows")
    tokens = rows.to(logits.device).repeat_interleave(logits.shape[0] // n_rows)  # (R * T,)
    expert = torch.topk(logits.float(), rank + 1, dim=-1).indices[:, rank]  # (R * T,)
    weak_indices = expert[:, None].expand_as(indices)
    weak_weights = torch.zeros_like(weights)
    weak_weights[:, 0] = 1
    new_indices = torch.where(tokens[:, None], weak_indices, indices)
    new_weights = torch.where(tokens[:, None], weak_weights, weights)
    return (logits, new_weights, new_indices, *output[3:])


def weak_routing_hooks(engine, rows: Callable[[], torch.Tensor], rank: int) -> list:
    """Install the hook on every router of ``engine``'s model; return the handles."""
    routers = engine.adapter.routers(engine.model)
    if not routers:
        raise InputError(
            f"scmoe needs a mixture-of-experts model; {engine.name!r} has no MoE router. "
            "Use an MoE model (e.g. Qwen3-VL-MoE, Mixtral, Qwen3-MoE)"
        )
    n_experts = min(getattr(r, "num_experts", rank + 1) for r in routers)
    if rank >= n_experts:
        raise InputError(f"method 'scmoe': parameter 'rank' = {rank} is out of range for a model "
                         f"with {n_experts} experts; allowed: 0 <= rank <= {n_experts - 1}")

    def hook(module, args, output):
        mask = rows()
        return weak_routing(output, mask, rank) if mask.any() else output

    return [router.register_forward_hook(hook) for router in routers]
