"""Warping equals transformers' warpers; sampling follows the distribution and its generator."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from veridical.decoding.sampling import sample, warp


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9)]
)
def test_warp_equals_transformers(temperature, top_k, top_p):
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = scores.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    before = scores.clone()
    out = warp(scores, temperature, top_k, top_p)
    assert torch.equal(scores, before)  # inputs are never modified
    assert torch.equal(out.isinf(), expected.isinf())
    torch.testing.assert_close(out[~out.isinf()], expected[~expected.isinf()])


def test_sample_matches_distribution_and_never_picks_filtered_tokens():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    scores = probs.log().expand(4000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens = sample(scores, gens)
    counts = torch.bincount(tokens, minlength=4).float() / 4000
    assert counts[1] == 0
    assert torch.allclose(counts, probs, atol=0.03)


def test_sample_uses_only_its_own_generator():
    scores = torch.randn(2, 30)
    a = sample(scores, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = sample(scores[1:], [torch.Generator().manual_seed(2)])
    assert a[1] == b[0]
