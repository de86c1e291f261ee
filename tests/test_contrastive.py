"""The contrastive family: formulas on hand-built logits, strength 0 = baseline, batch
invariance, branch inputs (no image on Qwen's rope), and SCMoE's weak routing."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_engine
from veridical.decoding.method import Branch, Method, apc
from veridical.decoding.methods.m3id import without_image
from veridical.decoding.registry import registered_for, resolve

Z = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
Z_NEG = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
INF = float("-inf")


def combine(spec, args, branches, step=0, z=Z):
    method = resolve(spec, args)
    before = {k: v.clone() for k, v in branches.items()}, z.clone()
    out = method.combine(z, branches, step)
    assert torch.equal(z, before[1]) and all(torch.equal(branches[k], before[0][k]) for k in branches)
    return out


def test_apc_keeps_tokens_within_beta_of_the_max():
    # log(0.1) = -2.303: keep z >= 2 - 2.303 = -0.303 -> tokens 0, 1, 2
    scores = torch.tensor([[5.0, 6.0, 7.0, 8.0]])
    assert torch.equal(apc(scores, Z, 0.1), torch.tensor([[5.0, 6.0, 7.0, INF]]))
    assert torch.equal(apc(scores, Z, 0.0), scores)


def test_apc_keeps_the_token_exactly_at_the_cutoff():
    # beta = 1: the cutoff is the max itself, so only the max (ties included) survives
    raw = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    scores = torch.tensor([[5.0, 6.0, 7.0, 8.0]])
    assert torch.equal(apc(scores, raw, 1.0), torch.tensor([[INF, 6.0, 7.0, INF]]))
    # a logit equal to log(beta) + max is kept; one just below it is not
    at = math.log(0.5)  # the max is 0, so the cutoff is exactly float32(log 0.5)
    raw = torch.tensor([[0.0, at, at - 1e-3, -0.5]])
    assert torch.equal(apc(scores, raw, 0.5), torch.tensor([[5.0, 6.0, INF, 8.0]]))


def test_vcd_formula():
    out = combine("vcd", {}, {"noised": Z_NEG})
    # (1+1)*z - 1*z_neg = [3, 0, 0, -6]; APC drops token 3 (z=-3 < -0.303)
    assert torch.equal(out, torch.tensor([[3.0, 0.0, 0.0, INF]]))
    out = combine("vcd", {"alpha": 0.5, "beta": 0.0}, {"noised": Z_NEG})
    assert torch.equal(out, torch.tensor([[2.5, 0.5, 0.0, -4.5]]))


def test_icd_and_scmoe_use_the_same_contrast():
    assert torch.equal(combine("icd", {}, {"disturbed": Z_NEG}),
                       torch.tensor([[3.0, 0.0, 0.0, INF]]))
    # SCMoE: (1+0.5) z - 0.5 z_weak, APC alpha=0.1; EOS bans need an engine (tested below)
    out = combine("scmoe", {"early_stop": True}, {"weak": Z_NEG})
    assert torch.equal(out, torch.tensor([[2.5, 0.5, 0.0, INF]]))


def test_ritual_formula_and_ritual_plus_vcd_sums_both_terms():
    z_t = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert torch.equal(combine("ritual", {}, {"transformed": z_t}),
                       torch.tensor([[2.0, 4.0, 3.0, INF]]))  # z + 3 z_T
    both = combine("ritual+vcd", {}, {"ritual.transformed": z_t, "vcd.noised": Z_NEG})
    # z + 3 z_T + 1 (z - z_neg) = [3, 3, 3, -3 + 3 - 3]; APC once
    assert torch.equal(both, torch.tensor([[3.0, 3.0, 3.0, INF]]))


def test_m3id_weight_grows_with_the_step():
    assert torch.equal(combine("m3id", {}, {"no_image": Z_NEG}, step=0),
                       torch.tensor([[2.0, 1.0, 0.0, INF]]))
    w = (1 - math.exp(-0.02 * 10)) / math.exp(-0.02 * 10)
    out = combine("m3id", {"beta": 0.0}, {"no_image": Z_NEG}, step=10)
    torch.testing.assert_close(out, Z + w * (Z - Z_NEG), rtol=0, atol=1e-6)


def test_m3id_lam_is_bounded_and_its_scores_stay_finite_at_any_step(images, prompts):
    """``expm1(lam * t)`` overflowed (OverflowError, a 500 from the server) for a large lam, and
    the float32 scores became inf/NaN past lam * t ~ 88: lam is now at most 1 and the exponent
    is capped (decoding/methods/m3id.py)."""
    engine = tiny_engine("llava")
    with pytest.raises(ValueError, match=r"'lam' = 400.0 is out of range.*lam <= 1"):
        engine.generate(images[0], prompts[0], method="m3id", method_args={"lam": 400},
                        max_new_tokens=3)
    z = 40.0 * Z  # logits of a realistic size, and a contrast of up to 120
    for step in (0, 1, 30, 88, 89, 709, 710, 4_000, 100_000):
        out = combine("m3id", {"lam": 1.0, "beta": 0.0}, {"no_image": -2.0 * z}, step=step, z=z)
        assert torch.isfinite(out).all(), step
    # the weight stops growing once lam * t reaches 30, and not before
    past = combine("m3id", {"lam": 1.0, "beta": 0.0}, {"no_image": Z_NEG}, step=100_000)
    torch.testing.assert_close(past, Z + math.expm1(30.0) * (Z - Z_NEG))
    before = combine("m3id", {"lam": 1.0, "beta": 0.0}, {"no_image": Z_NEG}, step=29)
    torch.testing.assert_close(before, Z + math.expm1(29.0) * (Z - Z_NEG))
    # at the range's edge, a long decode (ignoring EOS) keeps finite scores
    out = engine.generate(images[0], prompts[0], method="m3id", method_args={"lam": 1.0},
                          max_new_tokens=120, ignore_eos=True, logprobs=1)
    assert len(out.token_ids) == 120
    assert all(math.isfinite(t.logprob) for t in out.logprobs)


def test_pai_cfg_equals_the_log_prob_formula_up_to_a_row_constant():
    z_text = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    out = combine("pai_cfg", {"gamma": 2.0, "beta": 0.0}, {"text_only": z_text})
    s, s_text = Z.log_softmax(-1), z_text.log_softmax(-1)
    reference = 2.0 * (s - s_text) + s_text  # LALBJ/PAI CFG.py on log-probs
    torch.testing.assert_close(out.log_softmax(-1), reference.log_softmax(-1))


STRENGTH_ZERO = {
    "vcd": {"alpha": 0.0}, "ritual": {"alpha_pos": 0.0}, "m3id": {"lam": 0.0},
    "icd": {"alpha": 0.0}, "pai_cfg": {"gamma": 1.0},
}


@pytest.mark.parametrize("method", sorted(STRENGTH_ZERO))
def test_strength_zero_gives_baseline_tokens(method, images, prompts):
    engine = tiny_engine("llava")
    base = engine.generate(images, prompts, max_new_tokens=6)
    off = engine.generate(images, prompts, method=method, method_args=STRENGTH_ZERO[method],
                          max_new_tokens=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    # with APC off too, sampling and beam search are the baseline's as well
    args = {**STRENGTH_ZERO[method], "beta": 0.0}
    kw = dict(do_sample=True, seed=[1, 2, 3, 4], max_new_tokens=6)
    assert [r.token_ids for r in engine.generate(images, prompts, method=method, method_args=args,
                                                 **kw)] == \
        [r.token_ids for r in engine.generate(images, prompts, **kw)]
    beam = dict(num_beams=2, max_new_tokens=5)
    assert [r.token_ids for r in engine.generate(images[:2], prompts[:2], method=method,
                                                 method_args=args, **beam)] == \
        [r.token_ids for r in engine.generate(images[:2], prompts[:2], **beam)]


@pytest.mark.parametrize("arch,method", [
    ("llava", "vcd"), ("llava", "ritual"), ("llava", "icd"), ("llava", "pai_cfg"),
    ("llava", "ritual+vcd"), ("qwen2-vl", "m3id"), ("qwen2-vl", "vcd"), ("llava-next", "ritual"),
    ("qwen2.5-vl", "icd"), ("qwen3-vl-moe", "scmoe"), ("qwen3-moe", "scmoe"),
])
def test_batch_of_four_equals_each_alone(arch, method, images, prompts):
    engine = tiny_engine(arch)
    ims = images if engine.adapter.multimodal else [None] * 4
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, do_sample=True, seed=[5, 6, 7, 8])):
        batch = engine.generate(ims, prompts, method=method, **kw)
        assert [r.seed for r in batch] == kw.get("seed", [r.seed for r in batch])
        # each replayed alone with its seed (fresh ones without seed=) gives its tokens
        alone = [engine.generate(i, p, method=method, **{**kw, "seed": r.seed}).token_ids
                 for i, p, r in zip(ims, prompts, batch)]
        assert [r.token_ids for r in batch] == alone


class NoImageSwap(Method):
    """Test method: decode from the no-image branch alone (delta = z_u - z)."""

    name = "test_no_image_swap"

    def branches(self):
        return [Branch("no_image", make=without_image)]

    def delta(self, logits, branch_logits, step):
        return branch_logits["no_image"] - logits


@pytest.mark.parametrize("arch", ["qwen2-vl", "llava"])
def test_no_image_branch_equals_a_text_only_request(arch, images, prompts):
    """Rows without image tokens beside rows with them (Qwen's multimodal rope shifts
    positions) decode exactly like text-only requests."""
    engine = tiny_engine(arch)
    swapped = engine.generate(images, prompts, method="test_no_image_swap", max_new_tokens=6)
    text_only = engine.generate([None] * 4, prompts, max_new_tokens=6)
    assert [r.token_ids for r in swapped] == [r.token_ids for r in text_only]


def test_vcd_branch_is_seeded_per_request(images, prompts):
    engine = tiny_engine("llava")
    kw = dict(method="vcd", method_args={"alpha": 5.0}, max_new_tokens=8)
    a = engine.generate(images[0], prompts[0], seed=1, **kw).token_ids
    assert a == engine.generate(images[0], prompts[0], seed=1, **kw).token_ids
    assert any(engine.generate(images[0], prompts[0], seed=s, **kw).token_ids != a
               for s in (2, 3, 4))


@pytest.mark.parametrize("arch", ["qwen3-moe", "qwen3-vl-moe"])
def test_scmoe_weak_rank0_branch_equals_top1_routing(arch, prompts):
    """Reference: the same model with every router's top_k set to 1 and its weights
    renormalised (to 1) must give the weak branch's logits."""
    engine = tiny_engine(arch)
    from veridical.decoding.inputs import encode
    from veridical.decoding.routing import weak_routing_hooks

    inputs = encode(engine.processor, None, prompts[0])
    with torch.inference_mode():
        handles = weak_routing_hooks(engine, lambda: torch.tensor([True]), rank=0)
        try:
            hooked = engine.model(**inputs).logits
        finally:
            for h in handles:
                h.remove()
        routers = engine.adapter.routers(engine.model)
        saved = [(r.top_k, getattr(r, "norm_topk_prob", None)) for r in routers]
        for r in routers:
            r.top_k = 1
            if hasattr(r, "norm_topk_prob"):
                r.norm_topk_prob = True
        try:
            reference = engine.model(**inputs).logits
        finally:
            for r, (k, norm) in zip(routers, saved):
                r.top_k = k
                if norm is not None:
                    r.norm_topk_prob = norm
        plain = engine.model(**inputs).logits
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(hooked, plain)


def test_scmoe_bans_eos_unless_early_stop_and_strength_zero_is_baseline(prompts):
    engine = tiny_engine("qwen3-moe")
    base = engine.generate(None, prompts, max_new_tokens=6)
    off = engine.generate(None, prompts, method="scmoe",
                          method_args={"beta": 0.0, "early_stop": True}, max_new_tokens=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    saved = engine.eos_ids
    try:
        # several EOS ids, all tokens greedy decoding picks: every one is banned, not only the
        # first (the reference bans one id; see scmoe.py)
        engine.eos_ids = list(dict.fromkeys(base[0].token_ids[1:] + base[1].token_ids))
        banned = engine.generate(None, prompts[0], method="scmoe", max_new_tokens=6)
        assert not set(engine.eos_ids) & set(banned.token_ids) and len(banned.token_ids) == 6
    finally:
        engine.eos_ids = saved


def test_scmoe_on_a_dense_model_is_a_clear_error(images):
    with pytest.raises(ValueError, match="scmoe needs a mixture-of-experts model"):
        tiny_engine("llava").generate(images[0], "what ?", method="scmoe")
    with pytest.raises(ValueError, match="'rank' = 9 is out of range for a model with 4 experts"):
        tiny_engine("qwen3-moe").generate(None, "what ?", method="scmoe", method_args={"rank": 9})


@pytest.fixture(autouse=True, scope="module")
def test_methods_registered():
    """This module's test methods, registered for its tests only."""
    with registered_for(NoImageSwap):
        yield
