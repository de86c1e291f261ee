"""SynthCOCO: the synthetic COCO-format world with known ground truth, and the trainer of the
built-in model organism (``veridical.world``; nothing here imports ``veridical.evals`` except the
POPE question builder, which :func:`generate_world` calls to write the world's POPE files).

Public API:
- ``WorldConfig``, ``World``, ``build_world(config)``, ``sample_layout``, ``render_layout``: the
  world and its generative process (``.world``: categories, scenes, co-occurrence, layouts;
  ``.render``: glyphs and pixels; ``.text``: captions and MME questions).
- ``generate_world(out_dir, config, seed, splits) -> manifest``: a world on disk (``.generate``).
- ``BUILTIN_DATA`` (``"builtin:synthcoco"``), ``BUILTIN_SEED``, ``BUILTIN_SPLITS``,
  ``builtin_world(split="test") -> Path``: the shipped world, generated once into the cache
  folder (``veridical.cache.cache_dir()``) and reused.
- ``add_subcommands(subparsers)``: ``veridical world generate`` (``.generate``) and
  ``veridical world train`` (``.train``, which needs torch and transformers and is imported only
  when used).
"""

from .generate import (
    BUILTIN_DATA,
    BUILTIN_SEED,
    BUILTIN_SPLITS,
    GENERATOR_VERSION,
    add_subcommands,
    builtin_world,
    generate_world,
    resolve_data,
)
from .render import render_layout
from .world import World, WorldConfig, build_world, sample_layout

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_SEED",
    "BUILTIN_SPLITS",
    "GENERATOR_VERSION",
    "World",
    "WorldConfig",
    "add_subcommands",
    "build_world",
    "builtin_world",
    "generate_world",
    "render_layout",
    "resolve_data",
    "sample_layout",
]
