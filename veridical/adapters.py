"""Architecture adapters: what the engine and the methods need to know about a model family.

One :class:`Adapter` per family, chosen from ``config.model_type``. Everything is derived from the
config and the module tree, never from hard-coded token counts: the image token id, the language
model's decoder layers, each layer's attention module and output projection (``o_proj``), and the
MoE routers. Unknown architectures get an ``UnsupportedModelError`` listing the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    multimodal: bool = True

    def image_token_id(self, config) -> int | None:
        if not self.multimodal:
            return None
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        return None

    def text_config(self, config):
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder layers, in order."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"cannot find the decoder layers of {type(model).__name__} ({self.family} adapter)"
            )
        return layers

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    def o_proj(self, layer: torch.nn.Module) -> torch.nn.Module:
        return self.attention(layer).o_proj

    def routers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The MoE routers of the language model (empty for dense models), layer order."""
        found = []
        for layer in self.decoder_layers(model):
            for module in layer.modules():
                if type(module).__name__.endswith("Router") and hasattr(module, "top_k"):
                    found.append(module)
        return found


ADAPTERS = (
    Adapter("llava", ("llava",)),
    Adapter("llava-next", ("llava_next",)),
    Adapter("qwen2-vl", ("qwen2_vl",)),
    Adapter("qwen2.5-vl", ("qwen2_5_vl",)),
    Adapter("qwen3-vl", ("qwen3_vl", "qwen3_vl_moe")),
    Adapter(
        "text",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"),
        multimodal=False,
    ),
)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported. Supported model types: "
        f"{', '.join(supported_model_types())}"
    )
