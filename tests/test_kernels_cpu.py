"""veridical.kernels.cpu: the numba loops equal VAR's torch route (``var_reweight`` and
``rms_abs``), and ``generate`` gives the torch route's tokens with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_engine
from veridical.decoding.methods.var import var_reweight
from veridical.heads.scores import RMS_EPS, rms_abs
from veridical.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.NUMBA_AVAILABLE, reason="numba is not installed")


def test_sink_flags_equal_the_torch_rule():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 32, generator=g)
    hidden[0, 2, 5] = 40.0  # planted massive activations on the watched dims
    hidden[2, 7, 11] = -40.0
    hidden[1, 4, 6] = 40.0  # on a dim that is not watched
    dims = np.array([5, 11])
    out = torch.zeros(3, 9, 4, dtype=torch.bool)
    for threshold in (2.0, 3.0, 5.0):
        cpu.sink_flags_(hidden, dims, threshold, RMS_EPS, out, 2)
        expected = (rms_abs(hidden, dims=torch.from_numpy(dims)) > threshold).any(-1)
        assert torch.equal(out[..., 2], expected)
    assert out[0, 2, 2] and out[2, 7, 2] and not out[1, 4, 2] and 0 < out.sum() < 27
    assert not out[..., [0, 1, 3]].any()  # only the given layer's column is written


def test_var_decode_equals_var_reweight():
    g = torch.Generator().manual_seed(1)
    R, H, kv, L, T = 5, 4, 12, 3, 1
    image = torch.zeros(R, kv, dtype=torch.bool)
    image[:, 2:8] = True
    image[4] = False  # a text-only row: nothing to redistribute
    flags = torch.rand(R, kv, L, generator=g) < 0.35
    flags[3, 2:8, 1] = False  # a row without an image sink in layer 1
    past, fresh = flags[:, :-T].contiguous(), flags[:, -T:].contiguous()
    logits = torch.randn(R, H, 1, kv, generator=g) * 2
    logits[0, :, :, :3] = -1e9  # left padding: masked keys weigh nothing
    probs = torch.softmax(logits, -1)
    rows = torch.tensor([0, 1, 3, 4])  # the plan's rows (row 2 is another branch)
    queries = torch.ones(len(rows), 1, dtype=torch.bool)
    keys = cpu.decode_keys(image, past, fresh, rows)
    n_changed = 0
    for layer in range(L):
        for p, rho, summ in ((0.6, 0.5, 0.2), (0.3, 0.9, 0.05), (1.0, 0.5, 0.2)):
            got = cpu.var_decode(probs[rows], keys, layer, p, rho, summ)
            want, changed = var_reweight(probs[rows], image[rows], flags[rows, :, layer],
                                         queries, p, rho, summ)
            assert (got - want).abs().max() <= 1e-6
            assert torch.equal(got != probs[rows], want != probs[rows])  # same heads changed
            n_changed += int(changed.sum())
    assert n_changed > 0
    assert torch.equal(got, probs[rows])  # the last case: p = 1 changes nothing
    only_fresh = cpu.var_decode(probs, cpu.decode_keys(image, None, flags, torch.arange(R)), 0,
                                0.6, 0.5, 0.2)
    want, _ = var_reweight(probs, image, flags[..., 0], torch.ones(R, 1, dtype=torch.bool),
                           0.6, 0.5, 0.2)
    assert (only_fresh - want).abs().max() <= 1e-6


def test_var_epsilon_is_added_per_image_key():
    # keys: text, text sink, two image sinks, six image keys; weights exact in binary. The sink
    # share is 0.0625 / (0.125 + 8 * 1e-6) = 0.499968 (the reference's sum(image_attn + 1e-6)):
    # <= rho 0.49997, > rho 0.499966; with 1e-6 once (0.499996) it would exceed both.
    row = [0.5, 0.375, 0.03125, 0.03125, 0.015625, 0.015625] + [0.0078125] * 4
    edited = [0.5, 0.1875, 0.015625, 0.015625, 0.0703125, 0.0703125] + [0.03515625] * 4
    image = torch.tensor([[False, False] + [True] * 8])
    sink = torch.tensor([[False, True, True, True] + [False] * 6])
    keys = cpu.decode_keys(image, None, sink[..., None], torch.tensor([0]))
    query = torch.ones(1, 1, dtype=torch.bool)
    for rho, want in ((0.49997, edited), (0.499966, row)):
        probs = torch.tensor(row).reshape(1, 1, 1, 10)
        torch_route, _ = var_reweight(probs.double(), image, sink, query, 0.5, rho, 0.1)
        assert torch_route.flatten().tolist() == want
        assert cpu.var_decode(probs, keys, 0, 0.5, rho, 0.1).flatten().tolist() == want


def test_var_decode_takes_one_query_row():
    with pytest.raises(ValueError, match="one query row"):
        keys = cpu.decode_keys(torch.ones(1, 5, dtype=torch.bool), None,
                               torch.zeros(1, 5, 1, dtype=torch.bool), torch.tensor([0]))
        cpu.var_decode(torch.rand(1, 2, 3, 5), keys, 0, 0.6, 0.5, 0.2)


def test_the_loops_serve_only_float32_cpu_tensors_under_auto():
    from veridical.kernels import route

    assert route(torch.zeros(2)) == "cpu"
    assert route(torch.zeros(2, dtype=torch.bfloat16)) == "torch"
    assert route(torch.zeros(2, dtype=torch.float64)) == "torch"
    assert route(torch.zeros(2), "torch") == "torch" and route(torch.zeros(2), "triton") == "triton"
    assert route(torch.zeros(1, 2, 3, 4)) == "cpu"  # attention inputs on a CPU: not the kernel


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_generate_with_the_loops_gives_the_torch_routes_tokens(arch, images, prompts):
    engine = tiny_engine(arch)
    args = {"sink_dims": "3,7", "tau": 10.0, "summ": 0.01}
    kw = dict(method="var", method_args=args, max_new_tokens=8, logprobs=2)
    calls = []
    real = cpu.var_decode

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    try:
        cpu.var_decode = counting
        fused = engine.generate(images, prompts, **kw)
        engine.attention_impl = "torch"
        torch_route = engine.generate(images, prompts, **kw)
    finally:
        cpu.var_decode, engine.attention_impl = real, "auto"
    assert calls  # the loops ran
    assert [r.token_ids for r in fused] == [r.token_ids for r in torch_route]
    for a, b in zip(fused, torch_route):
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) <= 1e-5


def test_the_loops_flag_every_decode_token_and_agree_with_the_torch_routes_skipping(monkeypatch):
    # The built-in model with generated tokens as sink candidates (decode_sinks) and a sink rule
    # under which the cache holds image sinks in some edited layers only: the torch route skips
    # the others' flags at decode steps, the loops do not ask.
    import veridical
    import veridical.decoding.methods.var as var
    from veridical.bench import PROMPTS, bench_images

    engine = veridical.load("builtin:synthcoco-llava")
    images, prompts = bench_images(2), PROMPTS[:2]
    kw = dict(method="var", method_args={"sink_dims": "45", "tau": 20.0, "decode_sinks": True},
              max_new_tokens=8, logprobs=3)
    seen, real = [], var.may_have_image_sinks
    monkeypatch.setattr(var, "may_have_image_sinks", lambda plan: seen.append(
        (plan.fresh["var_sink"].shape[1], real(plan))) or seen[-1][1])
    engine.attention_impl = "torch"
    skipping = engine.generate(images, prompts, **kw)
    assert any(t == 1 and 0 < sum(s) < len(s) for t, s in seen)  # decode steps skip layers
    seen.clear()
    engine.attention_impl = "auto"
    loops = engine.generate(images, prompts, **kw)
    assert seen and all(t > 1 for t, _ in seen)  # asked at the prefill only
    assert [r.token_ids for r in loops] == [r.token_ids for r in skipping]
    for a, b in zip(loops, skipping):
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) <= 1e-5
