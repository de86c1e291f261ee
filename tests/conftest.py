"""Shared fixtures: tiny engines (cached per architecture) and small deterministic images."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU, Triton kernels run in its CPU interpreter; the flag must be set before any
# kernel is decorated, i.e. before any test module imports veridical.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import veridical  # noqa: E402

torch.set_num_threads(2)


@functools.cache
def tiny_engine(arch: str):
    return veridical.load(f"tiny-random:{arch}")


@pytest.fixture
def images() -> list[Image.Image]:
    """Four RGB images of different sizes and content."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray((rng.random((30 + 7 * i, 50 - 5 * i, 3)) * 255).astype("uint8"))
        for i in range(4)
    ]


@pytest.fixture
def prompts() -> list[str]:
    """Four prompts of different lengths (so the batch needs left padding)."""
    return [
        "what is in the image ?",
        "describe the image in detail please",
        "is there a dog",
        "how many cats are on the table in this picture",
    ]
