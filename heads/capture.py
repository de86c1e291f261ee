"""Capture what the head profiles need from one forward, with forward hooks only.

Contract:
- :func:`eager_attention` is a context manager that switches the LANGUAGE model to transformers'
  ``"eager"`` attention through the public ``set_attn_implementation`` (the vision tower is left
  alone) and restores the previous implementation on exit, also on error. Eager attention
  returns its post-softmax weights from each attention module, which is how the image-attention
  share is read; profiling is offline, so its cost does not matter. Any attention edit registered
  under another implementation name (``veridical.decoding.attention``) is bypassed meanwhile, so
  profiles always describe the unedited model. The switch is on the model object, so do not
  profile an engine while it is generating in another thread.
- :func:`capture` runs one forward of a single row (batch 1, no cache) under ``torch.no_grad``
  and returns a :class:`Capture`: every decoder layer's ``o_proj`` input at the last prompt
  position split into heads, optionally every layer's post-softmax attention row of that
  position, and optionally a reduction of every layer's input hidden states computed inside the
  hook (``hidden_fn(layer, h)`` with ``h`` of shape ``(T, D)``), so a large model's full hidden
  states are never all held at once. Hooks are removed before it returns, also on error.
- Layers, attention modules and ``o_proj`` come from the architecture adapter; nothing in
  transformers is patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from veridical.decoding.attention import text_attention
from veridical.decoding.capture import last_position_head_outputs

from .scores import split_heads


@dataclass
class Capture:
    """What one forward left behind (``L`` layers, ``H`` heads, ``T`` tokens)."""

    heads: torch.Tensor  # (L, H, Dh) float32: per-head attention output at the last position
    attention: torch.Tensor | None  # (L, H, T) float32: post-softmax row of the last position
    hidden: list[Any] | None  # per layer: hidden_fn(layer, h) of the layer input h (T, D)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, multimodal: bool) -> Iterator[None]:
    """Run the language model with eager attention inside the block (see the module docstring)."""
    with text_attention(model, "eager", multimodal):
        yield


def num_query_heads(model: torch.nn.Module) -> int:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(
            f"cannot read num_attention_heads from the text config of {type(model).__name__}; "
            "the head profiler needs a decoder with multi-head attention"
        )
    return heads


def prepare(engine: Any, row: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One encoded row on the model's device, pixels in the model's dtype."""
    return engine.collate([row])


def capture(
    engine: Any,
    inputs: dict[str, torch.Tensor],
    *,
    attention: bool = False,
    hidden_fn: Callable[[int, torch.Tensor], Any] | None = None,
) -> Capture:
    """One forward of ``inputs`` (one row, already on the device); see the module docstring."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(
            f"inputs must hold one row, got a batch of {inputs['input_ids'].shape[0]}; "
            "encode calibration items one at a time with veridical.decoding.inputs.encode"
        )
    model, adapter = engine.model, engine.adapter
    layers = adapter.decoder_layers(model)
    heads_n = num_query_heads(model)
    rows: list[torch.Tensor | None] = [None] * len(layers)
    reduced: list[Any] = [None] * len(layers)
    handles = []

    def on_attention(index: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"layer {index}'s attention returned no weights; run capture(..., "
                    "attention=True) inside eager_attention(model, ...)"
                )
            rows[index] = weights[0, :, -1].detach().float().cpu()  # (H, T)
        return hook

    def on_layer(index: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            reduced[index] = hidden_fn(index, h[0].detach())  # (T, D)
        return hook

    try:
        for i, layer in enumerate(layers):
            if attention:
                handles.append(adapter.attention(layer).register_forward_hook(on_attention(i)))
            if hidden_fn is not None:
                handles.append(layer.register_forward_pre_hook(on_layer(i), with_kwargs=True))
        with last_position_head_outputs(model, adapter, range(len(layers))) as outputs:
            with torch.no_grad():
                model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(layers)) if i not in outputs]
    if missing:
        raise RuntimeError(f"o_proj of layers {missing} did not run during the forward")
    heads = split_heads(torch.stack([outputs[i][0].cpu() for i in range(len(layers))]),
                        heads_n)  # (L, H, Dh)
    attn = torch.stack(rows) if attention else None  # (L, H, T)
    return Capture(heads=heads, attention=attn, hidden=reduced if hidden_fn is not None else None)
