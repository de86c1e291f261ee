"""Capturing what attention heads output: the one hook both VHR and the head profiler use.

:func:`last_position_head_outputs` records, while its block runs forwards, each chosen decoder
layer's attention output before ``o_proj`` (the heads' outputs side by side, ``(n, H * Dh)``)
at the last position of every row; the hooks sit on the adapter's public ``o_proj`` module and
are removed when the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def last_position_head_outputs(model: torch.nn.Module, adapter: Any, layers: Iterable[int]
                               ) -> Iterator[dict[int, torch.Tensor]]:
    """Yields ``captured``: after a forward inside the block, ``captured[layer]`` is that
    layer's ``o_proj`` input at each row's last position, (n, H * Dh) float32."""
    decoder = adapter.decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def record(module, args):
            captured[layer] = args[0][:, -1, :].detach().float()
        return record

    handles = [adapter.o_proj(decoder[layer]).register_forward_pre_hook(hook(layer))
               for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
