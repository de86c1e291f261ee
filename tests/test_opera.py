"""OPERA: the side-by-side candidate search equals beam search over the top-k candidates when its
penalty and rollback are off; its scores equal a direct computation on materialised eager
attention; a crafted summary-token column triggers rollback with bans and limits; batches equal
requests decoded alone."""

from __future__ import annotations

import pytest
import torch

import veridical.decoding.opera as opera_module
from tests.conftest import tiny_engine
from veridical.decoding.method import Method
from veridical.decoding.methods.opera import OPERA
from veridical.decoding.opera import column_scores, rollback_target
from veridical.decoding.registry import resolve
from veridical.errors import InputError

OFF = {"penalty_weights": 0.0, "threshold": 10**6}


class TopKBeams(Method):
    """Beam search restricted to each beam's top-k raw logits, the rest at -999 before the
    log-softmax: what OPERA searches over when its penalty and rollback are off."""

    name = "topk_beams_test"

    def __init__(self, k: int, inner: Method | None = None):
        super().__init__()
        self.k, self.inner = k, inner

    def branches(self):
        return self.inner.branches() if self.inner else []

    def attention_edits(self, engine):
        return self.inner.attention_edits(engine) if self.inner else []

    def prepare(self, engine, requests):
        return self.inner.prepare(engine, requests) if self.inner else {}

    def combine(self, logits, branch_logits, step):
        scores = self.inner.combine(logits, branch_logits, step) if self.inner else logits
        value, index = scores.topk(self.k, dim=-1)
        return scores.new_full(scores.shape, -999.0).scatter(1, index, value)


def opera(trace=None, **args) -> OPERA:
    method = OPERA(**args)
    method.trace = trace
    return method


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl", "llama"])
@pytest.mark.parametrize("k", [5, 2])
def test_penalty_and_rollback_off_equal_topk_beam_search(arch, k, images, prompts):
    engine = tiny_engine(arch)
    imgs = [None] * 4 if arch == "llama" else images
    got = engine.generate(imgs, prompts, method=opera(num_attn_candidates=k, beams=3, **OFF),
                          max_new_tokens=12)
    want = engine.generate(imgs, prompts, method=TopKBeams(k), num_beams=3, max_new_tokens=12)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]


@pytest.mark.parametrize("other, args", [("pai", {"alpha": 0.5, "gamma": 1.0}),
                                         ("vcd", {"alpha": 1.0})])
def test_composes_with_edits_and_branches(other, args, images, prompts):
    """opera+pai / opera+vcd with OPERA's penalty off = top-k beam search over PAI's edited or
    VCD's contrasted scores (the edit reaches every side-by-side candidate; the branch rows get
    the same candidates)."""
    engine = tiny_engine("llava")
    method = resolve(f"opera+{other}", {"opera": OFF, other: args})
    got = engine.generate(images[:2], prompts[:2], method=method, max_new_tokens=10)
    want = engine.generate(images[:2], prompts[:2], method=TopKBeams(5, resolve(other, args)),
                           num_beams=5, max_new_tokens=10)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    plain = engine.generate(images[:2], prompts[:2], method=opera(**OFF), max_new_tokens=10)
    assert [g.token_ids for g in got] != [p.token_ids for p in plain]  # the other method acted


def test_scores_equal_direct_computation_on_materialised_attention(images):
    """Every candidate's window scores and image mass, recomputed by one eager forward over
    prompt + beam tokens + candidate with output_attentions (last layer, max over heads,
    rows renormalised, the reference's column product)."""
    engine = tiny_engine("llava")
    trace: list = []
    prompt = "describe the image in detail please"
    engine.generate(images[0], prompt, method=opera(trace=trace, beams=2,
                                                    num_attn_candidates=3),
                    max_new_tokens=14)
    enc = engine._encode(engine.request(images[0], prompt, 0))
    start = enc["input_ids"].shape[1]
    image_id = engine.adapter.image_token_id(engine.model.config)
    model = engine.model
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    checked = 0
    try:
        for step in trace:
            if "t" not in step or step["t"] not in (0, 5, 11, 13):
                continue
            for j, tokens in enumerate(step["tokens"]):
                for c, cand in enumerate(step["candidates"][j].tolist()):
                    ids = torch.cat([enc["input_ids"][0], torch.tensor(tokens + [cand])])[None]
                    with torch.no_grad():
                        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    pixel_values=enc["pixel_values"], output_attentions=True)
                    att = out.attentions[-1][0].float().amax(0)  # (T, T)
                    att = att / att.sum(-1, keepdim=True)
                    window = att[start:, start:]
                    scores = column_scores(window, 50.0)
                    torch.testing.assert_close(step["scores"][j, c], scores, rtol=1e-4, atol=0)
                    mass = att[-1, ids[0] == image_id].sum()
                    torch.testing.assert_close(step["image_mass"][j, c], mass, rtol=1e-4,
                                               atol=1e-6)
                    checked += 1
    finally:
        model.set_attn_implementation({"text_config": previous})
    assert checked == 4 * 2 * 3


def test_column_scores_by_hand():
    w = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.4, 0.0], [0.1, 0.3, 0.6]])
    want = 1e-7 * torch.tensor([(50 * 0.5) * (50 * 0.2) * (50 * 0.1), (50 * 0.4) * (50 * 0.3),
                                50 * 0.6])
    torch.testing.assert_close(column_scores(w, 50.0), want)


def test_rollback_target_rule():
    history = torch.tensor([[12, 12, 12, 3], [12, 12, 5, 12]])
    assert rollback_target(history, 12, threshold=2)
    assert not rollback_target(history, 12, threshold=3)  # beam 0 has it 3 times, not > 3
    assert not rollback_target(torch.full((2, 40), 9), 9, threshold=2)  # columns < 10 never


@pytest.fixture
def summary_column(monkeypatch):
    """A crafted pattern: from token 11 on, every candidate puts 60% of its attention on the
    response token 10 (a summary token), the rest scaled down."""
    real = opera_module._normalised

    def crafted(probs, columns, own):
        rows = real(probs, columns, own)
        if rows.shape[-1] > 11:
            rows = rows * 0.4
            rows[..., 10] = 0.6
        return rows

    monkeypatch.setattr(opera_module, "_normalised", crafted)


def test_summary_column_triggers_rollback_with_bans_and_limits(summary_column, images):
    engine = tiny_engine("llava")
    prompt = "describe the image in detail please"
    trace: list = []
    args = {"beams": 2, "num_attn_candidates": 2, "threshold": 3}
    out = engine.generate(images[0], prompt, method=opera(trace=trace, **args),
                          max_new_tokens=24)
    rollbacks = [s["rollback_to"] for s in trace if "rollback_to" in s]
    assert rollbacks, "the summary column never triggered a rollback"
    # position 11 (= column 10 + 1) is rolled back to at most num_attn_candidates times, then
    # the previous position, then never again
    assert rollbacks.count(11) <= 2 and set(rollbacks) <= {10, 11}
    assert max(rollbacks.count(p) for p in set(rollbacks)) <= 2
    assert rollbacks[0] == 11
    # after each rollback the redone position avoids every banned (beam, token) choice: the
    # step after a rollback to r starts from different tokens at r than before
    steps = [s for s in trace if "t" in s]
    before = {}
    for s in steps:
        for toks in s["tokens"]:
            if len(toks) > 11:
                before.setdefault(tuple(toks[:11]), set()).add(toks[11])
    assert any(len(v) > 1 for v in before.values()), "no new token was chosen at position 11"
    plain = engine.generate(images[0], prompt, method=opera(**{**args, "threshold": 10**6}),
                            max_new_tokens=24)
    assert out.token_ids != plain.token_ids


def test_batch_equals_alone_with_rollbacks(summary_column, images, prompts):
    engine = tiny_engine("llava")
    args = {"beams": 2, "num_attn_candidates": 2, "threshold": 3}
    batch = engine.generate(images, prompts, method=opera(**args), max_new_tokens=20)
    for image, prompt, got in zip(images, prompts, batch):
        alone = engine.generate(image, prompt, method=opera(**args), max_new_tokens=20)
        assert got.token_ids == alone.token_ids


def test_batch_equals_alone_defaults(images, prompts):
    engine = tiny_engine("qwen2-vl")
    batch = engine.generate(images, prompts, method="opera", max_new_tokens=12)
    for image, prompt, got in zip(images, prompts, batch):
        assert got.token_ids == engine.generate(image, prompt, method="opera",
                                                max_new_tokens=12).token_ids


def test_fast_preset_and_bad_settings(images, prompts):
    engine = tiny_engine("llava")
    fast = resolve("opera_fast")
    assert fast.args["threshold"] == 25 and fast.args["num_attn_candidates"] == 1
    out = engine.generate(images[:2], prompts[:2], method=fast, max_new_tokens=8)
    assert all(len(o.token_ids) >= 1 for o in out)
    with pytest.raises(InputError, match="do_sample"):
        engine.generate(images[0], prompts[0], method="opera", do_sample=True)
    with pytest.raises(InputError, match="beams"):
        engine.generate(images[0], prompts[0], method="opera", num_beams=3)
    with pytest.raises(ValueError, match="num_attn_candidates"):
        resolve("opera", {"num_attn_candidates": 0})
