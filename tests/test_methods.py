"""The method registry, parameter validation, composition, and the engine's branch machinery."""

from __future__ import annotations

import pytest
import torch

import veridical
from tests.conftest import tiny_engine
from veridical.decoding.method import Branch, Method, Param, Request
from veridical.decoding.registry import Composite, registered_for, resolve


class PromptSwap(Method):
    """Test method: one branch with another prompt, whose logits replace the real ones.

    Since every branch is fed the tokens chosen for its request, the output must equal plain
    decoding of the branch's prompt: an exact check of branch rows, caches and reordering."""

    name = "test_swap"
    params = (Param("weight", 1.0, "share of the branch logits", low=0.0, high=1.0),)

    def branches(self):
        return [Branch("swap", make=lambda r, rng: Request(r.image, r.prompt + " " + SUFFIX))]

    def delta(self, logits, branch_logits, step):
        return self.args["weight"] * (branch_logits["swap"] - logits)


class Shift(Method):
    """Test method with no branch: adds a constant bias to one token's logit."""

    name = "test_shift"
    params = (
        Param("token", 0, "token id to push", type=int, low=0),
        Param("bias", 0.0, "added logit"),
        Param("weight", 1.0, "unused; shares a name with test_swap's", low=0.0),
    )

    def delta(self, logits, branch_logits, step):
        out = torch.zeros_like(logits)
        out[:, self.args["token"]] = self.args["bias"]
        return out


SUFFIX = "in detail please"


def test_unknown_method_suggests_close_name():
    with pytest.raises(ValueError, match=r"unknown method 'nnoe'.*Did you mean 'none'.*Available"):
        resolve("nnoe")


def test_parameter_errors_name_parameter_value_and_range():
    with pytest.raises(ValueError, match=r"'test_swap'.*'weight' = 2.0 is out of range.*<= 1"):
        resolve("test_swap", {"weight": 2})
    with pytest.raises(ValueError, match=r"no parameter 'wieght'.*Did you mean 'weight'"):
        resolve("test_swap", {"wieght": 0.5})
    with pytest.raises(ValueError, match=r"'weight' = 'abc' is not a number"):
        resolve("test_swap", {"weight": "abc"})
    with pytest.raises(ValueError, match=r"'token' = 1.5 must be a whole number"):
        resolve("test_shift", {"token": 1.5})
    with pytest.raises(ValueError, match=r"'weight' = nan is out of range"):
        resolve("test_swap", {"weight": float("nan")})


def test_defaults_and_string_values_are_coerced():
    m = resolve("test_shift", {"token": "3", "bias": "2.5"})
    assert m.args == {"token": 3, "bias": 2.5, "weight": 1.0}
    assert resolve("test_swap").args == {"weight": 1.0}


def test_composition_routes_arguments():
    m = resolve("test_swap+test_shift", {"bias": 1.0, "test_swap.weight": 0.5, "test_shift": {"token": 2}})
    assert isinstance(m, Composite) and m.name == "test_swap+test_shift"
    assert m.parts[0].args == {"weight": 0.5}
    assert m.parts[1].args == {"token": 2, "bias": 1.0, "weight": 1.0}
    assert [b.name for b in m.branches()] == ["test_swap.swap"]
    with pytest.raises(ValueError, match=r"'weight' belongs to several methods"):
        resolve("test_swap+test_shift", {"weight": 0.5})
    with pytest.raises(ValueError, match=r"no method in 'test_swap\+test_shift' has a parameter 'alpha'"):
        resolve("test_swap+test_shift", {"alpha": 0.5})
    with pytest.raises(ValueError, match=r"names a method twice"):
        resolve("none+none")
    with pytest.raises(ValueError, match=r"empty part"):
        resolve("none+")


def test_methods_lists_every_method_with_parameters():
    listing = {m["name"]: m for m in veridical.methods()}
    assert "none" in listing and listing["none"]["params"] == []
    weight = listing["test_swap"]["params"][0]
    assert weight == {"name": "weight", "default": 1.0, "type": "float",
                      "range": "weight >= 0 and weight <= 1", "doc": "share of the branch logits"}


def test_combine_does_not_modify_inputs():
    logits = torch.randn(2, 7)
    branch = torch.randn(2, 7)
    before = (logits.clone(), branch.clone())
    resolve("test_swap+test_shift", {"bias": 3.0, "test_swap.weight": 0.5}).combine(
        logits, {"test_swap.swap": branch}, 0)
    assert torch.equal(logits, before[0]) and torch.equal(branch, before[1])


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_branch_rows_decode_like_their_own_request(arch, images, prompts):
    engine = tiny_engine(arch)
    swapped = engine.generate(images, prompts, method="test_swap", max_new_tokens=8)
    direct = engine.generate(images, [p + " " + SUFFIX for p in prompts], max_new_tokens=8)
    assert [r.token_ids for r in swapped] == [r.token_ids for r in direct]
    # prompt counts describe the real input, not the branch
    plain = engine.generate(images, prompts, max_new_tokens=1)
    assert [r.prompt_tokens for r in swapped] == [r.prompt_tokens for r in plain]


def test_branch_caches_follow_beam_reordering(images, prompts):
    engine = tiny_engine("llava")
    kw = dict(num_beams=3, max_new_tokens=8)
    swapped = engine.generate(images, prompts, method="test_swap", **kw)
    direct = engine.generate(images, [p + " " + SUFFIX for p in prompts], **kw)
    assert [r.token_ids for r in swapped] == [r.token_ids for r in direct]


def test_weight_zero_gives_baseline_and_sampling_stays_batch_invariant(images, prompts):
    engine = tiny_engine("llava")
    base = engine.generate(images, prompts, max_new_tokens=8)
    off = engine.generate(images, prompts, method="test_swap", method_args={"weight": 0.0},
                          max_new_tokens=8)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    kw = dict(method="test_swap", method_args={"weight": 0.5}, do_sample=True, seed=[1, 2, 3, 4],
              max_new_tokens=8)
    batch = engine.generate(images, prompts, **kw)
    alone = [
        engine.generate(i, p, **{**kw, "seed": s}).token_ids
        for i, p, s in zip(images, prompts, [1, 2, 3, 4])
    ]
    assert [r.token_ids for r in batch] == alone


def test_logit_combination_reaches_the_search(images, prompts):
    engine = tiny_engine("llava")
    out = engine.generate(images[0], prompts[0], method="test_shift",
                          method_args={"token": 7, "bias": 1e4}, max_new_tokens=3)
    assert out.token_ids == [7, 7, 7]


@pytest.fixture(autouse=True, scope="module")
def test_methods_registered():
    """This module's test methods, registered for its tests only."""
    with registered_for(PromptSwap, Shift):
        yield
