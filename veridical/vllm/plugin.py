"""vLLM plugin: models whose image processing applies a branch's pixel transform (VCD's noise).

A branch that changes the processor's normalised pixel tensor (``Branch.on_pixels``) cannot be
sent to vLLM as an image: the result is a float tensor, not a picture. So each supported vLLM
model class gets a subclass, registered under ``Veridical<Architecture>``, whose multimodal
processor runs vLLM's own processing and then, when the request carries the flat processor
argument ``veridical_pixels``, applies the branch's ``on_pixels`` to ``pixel_values`` with the
branch's generator: the same function and the same draws as veridical's engine
(``Engine.branch_rows``). Without that argument the subclass behaves exactly like its parent.

``veridical_pixels`` is a JSON string ``{"method", "args", "branch", "rng"}``: the method's
name and arguments, the branch's name, and the generator's state (hex) after the branch's
``make``. It is part of the processor arguments, so vLLM's processor cache and prefix cache key
on it: a noised image never shares a cache entry with the clean one.

``register()`` is the ``vllm.general_plugins`` entry point (vLLM calls it in every process);
``architecture(name)`` gives the registered name for a model's architecture, or None.
"""

from __future__ import annotations

import json
from typing import Any

import torch

PIXELS_KEY = "veridical_pixels"
PREFIX = "Veridical"
# vLLM model classes whose processing is wrapped: (module under vllm.model_executor.models, class)
SUPPORTED = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
_done = False


def architecture(name: str) -> str | None:
    """The registered architecture name for the HF architecture ``name``, or None."""
    return PREFIX + name if name in SUPPORTED else None


def pixels_argument(method: str, args: dict, branch: str, rng: torch.Generator) -> str:
    """The ``veridical_pixels`` value for a branch whose generator is ``rng`` (after ``make``)."""
    return json.dumps({"method": method, "args": args, "branch": branch,
                       "rng": bytes(rng.get_state().tolist()).hex()}, sort_keys=True)


def apply_pixels(spec: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """``pixel_values`` after the branch's ``on_pixels`` named by the ``veridical_pixels`` value."""
    from veridical.decoding.registry import resolve

    data = json.loads(spec)
    method = resolve(data["method"], data["args"])
    branch = next(b for b in method.branches() if b.name == data["branch"])
    rng = torch.Generator()
    rng.set_state(torch.tensor(list(bytes.fromhex(data["rng"])), dtype=torch.uint8))
    return branch.on_pixels(pixel_values, rng)


class _InfoMixin:
    def get_hf_processor(self, **kwargs: Any):
        kwargs.pop(PIXELS_KEY, None)
        return super().get_hf_processor(**kwargs)


class _ProcessorMixin:
    def _call_hf_processor(self, hf_data, hf_kwargs):
        kwargs = dict(hf_kwargs)
        spec = kwargs.pop(PIXELS_KEY, None)
        out = super()._call_hf_processor(hf_data, kwargs)
        if spec is not None and "pixel_values" in out:
            out["pixel_values"] = apply_pixels(spec, out["pixel_values"])
        return out


def _subclass(base: type, mixin: type) -> type:
    return type(f"{PREFIX}{base.__name__}", (mixin, base), {})


def _wrapped(model_cls: type) -> type:
    from vllm.multimodal import MULTIMODAL_REGISTRY

    factories = model_cls._processor_factory  # vLLM's registration record

    def info(ctx):
        return _subclass(type(factories.info(ctx)), _InfoMixin)(ctx)

    def processor(info_obj, dummy_inputs):
        base = type(factories.processor(info_obj, dummy_inputs))
        return _subclass(base, _ProcessorMixin)(info_obj, dummy_inputs)

    sub = type(PREFIX + model_cls.__name__, (model_cls,), {})
    return MULTIMODAL_REGISTRY.register_processor(
        processor, info=info, dummy_inputs=factories.dummy_inputs)(sub)


def register() -> None:
    """Register the wrapped model classes with vLLM (idempotent)."""
    global _done
    if _done:
        return
    import importlib

    from vllm import ModelRegistry

    for name, module in SUPPORTED.items():
        cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
        ModelRegistry.register_model(PREFIX + name, _wrapped(cls))
    _done = True
