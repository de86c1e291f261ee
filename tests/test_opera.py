"""OPERA: the side-by-side candidate search equals beam search over the top-k candidates when its
penalty and rollback are off; its scores equal a direct computation on materialised eager
attention and stay finite and ranked where a float32 product overflows; the image-mass term
covers exactly the first 10 tokens; a beam that continues with a -999 filler has that token in
its cache; a crafted summary-token column triggers rollback with bans, limits and the window
edge; batches equal requests decoded alone."""

from __future__ import annotations

import copy

import pytest
import torch

import veridical.decoding.opera as opera_module
from tests.conftest import tiny_engine
from veridical.decoding.method import Method
from veridical.decoding.methods.opera import OPERA
from veridical.decoding.opera import (
    PENALTY_MAX,
    candidate_log_scores,
    log_column_products,
    log_column_scores,
    penalty,
    rollback_position,
    rollback_target,
)
from veridical.decoding.registry import Composite, resolve
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

    def attention_edits(self, ctx):
        return self.inner.attention_edits(ctx) if self.inner else []

    def prepare(self, ctx, requests):
        return self.inner.prepare(ctx, requests) if self.inner else {}

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
    the same candidates). The reference is ``other`` alone as a composite, so its branches have
    the composite's names, from which VCD's noise is seeded."""
    engine = tiny_engine("llava")
    method = resolve(f"opera+{other}", {"opera": OFF, other: args})
    got = engine.generate(images[:2], prompts[:2], method=method, max_new_tokens=10, seed=0)
    reference = TopKBeams(5, Composite([resolve(other, args)]))
    want = engine.generate(images[:2], prompts[:2], method=reference, num_beams=5,
                           max_new_tokens=10, seed=0)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    plain = engine.generate(images[:2], prompts[:2], method=opera(**OFF), max_new_tokens=10,
                            seed=0)
    assert [g.token_ids for g in got] != [p.token_ids for p in plain]  # the other method acted


def reference_scores(window: torch.Tensor, scale: float = 50.0) -> torch.Tensor:
    """The reference's column scores ``1e-7 * prod_{i >= j} scale * window[i, j]``, in float64."""
    w = window.double()
    return torch.stack([1e-7 * (scale * w[j:, j]).prod() for j in range(w.shape[-1])])


def after_prompt(engine, enc: dict, prompt_out, tokens: list[int], **kwargs):
    """A plain forward over ``tokens`` after the prompt's (``prompt_out``: of
    ``engine.model(**enc, use_cache=True)``, its image merged; a filler may be the image token,
    which must not be merged)."""
    if not tokens:
        return prompt_out
    cache = copy.deepcopy(getattr(prompt_out, "cache", None) or prompt_out.past_key_values)
    mask = torch.ones(1, enc["input_ids"].shape[1] + len(tokens), dtype=torch.long)
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor([tokens]), attention_mask=mask,
                            use_cache=True, **{engine.cache_kw: cache}, **kwargs)


@pytest.mark.parametrize("name, args, steps", [
    ("opera", {"beams": 2, "num_attn_candidates": 3}, (0, 5, 11, 13)),
    ("opera_fast", {}, (1, 2, 11)),  # its beams come from a replay after step 0 (fillers)
])
def test_scores_equal_direct_computation_on_materialised_attention(name, args, steps, images):
    """Every candidate's window scores and image mass, recomputed by plain eager forwards
    over prompt + beam tokens + candidate with output_attentions (last layer, max over heads,
    rows renormalised, the window from the first response token on, the reference's column
    product)."""
    engine = tiny_engine("llava")
    trace: list = []
    method = resolve(name, args)
    method.trace = trace
    prompt = "describe the image in detail please"
    engine.generate(images[0], prompt, method=method, max_new_tokens=14)
    enc = engine.context().encode(engine.request(images[0], prompt, 0))
    start = enc["input_ids"].shape[1]
    image = enc["input_ids"][0] == engine.adapter.image_token_id(engine.model.config)
    model = engine.model
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    checked = 0
    try:
        with torch.no_grad():
            prompt_out = model(**enc, use_cache=True)
        for step in trace:
            if "t" not in step or step["t"] not in steps:
                continue
            for j, tokens in enumerate(step["tokens"]):
                for c, cand in enumerate(step["candidates"][j].tolist()):
                    out = after_prompt(engine, enc, prompt_out, tokens + [cand],
                                       output_attentions=True)
                    att = out.attentions[-1][0].float().amax(0)  # (t + 1, L + t + 1)
                    att = att / att.sum(-1, keepdim=True)
                    torch.testing.assert_close(step["log_scores"][j, c].exp(),
                                               reference_scores(att[:, start:]), rtol=1e-4,
                                               atol=0)
                    mass = att[-1, :start][image].sum()
                    torch.testing.assert_close(step["image_mass"][j, c], mass, rtol=1e-4,
                                               atol=1e-6)
                    checked += 1
    finally:
        model.set_attn_implementation({"text_config": previous})
    assert checked == len(steps) * method.args["beams"] * method.args["num_attn_candidates"]


def test_column_scores_by_hand():
    w = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.4, 0.0], [0.1, 0.3, 0.6]])
    want = 1e-7 * torch.tensor([(50 * 0.5) * (50 * 0.2) * (50 * 0.1), (50 * 0.4) * (50 * 0.3),
                                50 * 0.6], dtype=torch.float64)
    torch.testing.assert_close(log_column_scores(w, 50.0).exp(), want)
    # a candidate's scores: the beam's earlier rows' products times its own row
    rows = torch.tensor([[[0.1, 0.3, 0.6], [0.2, 0.2, 0.6]]])  # (nb=1, k=2, t + 1 = 3)
    got = candidate_log_scores(log_column_products(w[:2, :2], 50.0)[None], rows, 50.0).exp()
    for c in range(2):
        window = torch.cat([w[:2], rows[0, c][None]])
        torch.testing.assert_close(got[0, c], reference_scores(window))


def crafted_windows(n_rows: int, nb: int = 5, k: int = 5, seed: int = 0):
    """``nb`` beams of ``n_rows - 1`` response rows and ``k`` candidates each, every attention
    weight near 0.19: (earlier rows (nb, n - 1, n - 1), candidate rows (nb, k, n))."""
    g = torch.Generator().manual_seed(seed)
    earlier = (0.185 + 0.01 * torch.rand(nb, n_rows - 1, n_rows - 1, generator=g)).tril()
    return earlier, 0.185 + 0.01 * torch.rand(nb, k, n_rows, generator=g)


def test_strongly_attended_columns_give_finite_ranked_penalties():
    """The audit's case: 40 response rows at about 0.19 attention. The float32 product of a
    column overflows (9.5 ** 40 > 3.4e38, before the 1e-7), which made every one of the 25
    candidates' penalties inf; in log space they are the exact ones (about 1e32): finite,
    distinct, ranked as a float64 computation ranks them, at the same column."""
    earlier, cand = crafted_windows(40)
    assert torch.isinf((50 * earlier[0, :, 0]).prod() * 50 * cand[0, 0, 0])  # float32 overflows
    log_scores = candidate_log_scores(log_column_products(earlier, 50.0), cand, 50.0)
    pen, loc = penalty(log_scores, torch.zeros(5, 5), n_response=40, weight=1.0)
    want = torch.empty(5, 5, dtype=torch.float64)
    want_loc = torch.empty(5, 5, dtype=torch.long)
    for b in range(5):
        for c in range(5):
            window = torch.cat([torch.nn.functional.pad(earlier[b], (0, 1)), cand[b, c][None]])
            scores = reference_scores(window)
            want[b, c], want_loc[b, c] = scores.max(), scores.argmax()
    assert torch.isfinite(pen).all() and pen.unique().numel() == 25
    assert (pen.flatten().argsort() == want.flatten().argsort()).all()
    torch.testing.assert_close(pen.double(), want, rtol=1e-6, atol=0)
    assert (loc == want_loc).all()
    # penalty_weights scales it; 0 turns it off
    torch.testing.assert_close(penalty(log_scores, torch.zeros(5, 5), 40, 2.0)[0], 2 * pen)
    assert (penalty(log_scores, torch.zeros(5, 5), 40, 0.0)[0] == 0).all()


def test_penalty_beyond_float32_is_capped_and_keeps_the_exact_column():
    """Where even the exact penalty exceeds float32 (300 rows at 0.19: about 1e280), it is
    float32's largest value: finite, and above every penalty that fits; the column of the max
    is still the exact one (not the first of tied infinities)."""
    earlier, cand = crafted_windows(300, nb=1, k=2)
    cand[0, 1] = 1e-3  # the second candidate barely attends: its max column is still column 0
    log_scores = candidate_log_scores(log_column_products(earlier, 50.0), cand, 50.0)
    assert (log_scores[0, :, 0] > 600).all()  # exp(600) overflows float32 by far
    log_scores[0, 1] -= 600.0  # ... now the second candidate's fits
    pen, loc = penalty(log_scores, torch.zeros(1, 2), n_response=300, weight=1.0)
    assert pen[0, 0] == PENALTY_MAX and torch.isfinite(pen).all()
    assert pen[0, 1] == log_scores[0, 1].max().exp().float() < PENALTY_MAX
    assert (loc == log_scores.argmax(-1)).all() and loc[0, 0] == 0
    huge = candidate_log_scores(log_column_products(earlier[:, :20, :20], 1e30), cand[..., :21],
                                1e30)  # no overflow of scale * A either
    assert torch.isfinite(penalty(huge, torch.zeros(1, 2), 21, 1.0)[0]).all()


def test_image_mass_term_covers_exactly_the_first_10_tokens(images):
    """Tokens 0-9 (n_response <= 10) lose minus weight x their image mass; token 10 on, the
    over-trust penalty: by hand at the boundary, and in a real run at every step."""
    log_scores = torch.log(torch.tensor([[[1e-3, 2e-3], [5e-3, 1e-3]]], dtype=torch.float64))
    mass = torch.tensor([[0.25, 0.5]])
    for n_response, want in [(9, -2 * mass), (10, -2 * mass),
                             (11, torch.tensor([[4e-3, 1e-2]])), (12, torch.tensor([[4e-3, 1e-2]]))]:
        got, _ = penalty(log_scores, mass, n_response, weight=2.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    engine = tiny_engine("llava")
    trace: list = []
    engine.generate(images[0], "describe the image in detail please",
                    method=opera(trace=trace, beams=2, num_attn_candidates=3), max_new_tokens=13)
    seen = set()
    for step in trace:
        if "t" not in step:
            continue
        seen.add(step["t"])
        if step["t"] < 10:
            assert torch.equal(step["penalty"], -step["image_mass"])
        else:
            assert torch.equal(step["penalty"], step["log_scores"].amax(-1).exp().float())
    assert {8, 9, 10, 11} <= seen


def filler_steps(trace: list) -> list[int]:
    """The steps ``t`` at which some beam continued with a token outside its parent's
    candidates (a -999 filler)."""
    steps = [s for s in trace if "t" in s]
    found = []
    for step, after in zip(steps, steps[1:]):
        if after["t"] != step["t"] + 1:
            continue
        for tokens in after["tokens"]:
            parents = [p for p, have in enumerate(step["tokens"]) if have == tokens[:-1]]
            if all(tokens[-1] not in step["candidates"][p].tolist() for p in parents):
                found.append(step["t"])
    return found


def assert_caches_hold_emitted_tokens(engine, image, prompt: str, trace: list) -> None:
    """At every step, each beam's next-token logits (computed from its cache) equal plain
    forwards over the prompt and the tokens the beam emitted: the cache holds what was
    emitted."""
    enc = engine.context().encode(engine.request(image, prompt, 0))
    with torch.no_grad():
        prompt_out = engine.model(**enc, use_cache=True)
    for step in [s for s in trace if "t" in s]:
        assert step["tokens"] == step["running"]
        for j, emitted in enumerate(step["running"]):
            out = after_prompt(engine, enc, prompt_out, emitted)
            torch.testing.assert_close(step["logits"][j], out.logits[0, -1].float(),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["huge_scale", "inf_penalty", "fast", "fast_eos"])
def test_a_beam_continuing_with_a_filler_has_it_in_cache(case, images, monkeypatch):
    """Beams that continue with a -999 filler (all candidates below -999: a huge scale_factor
    from token 10 on, or a crafted -inf; fewer candidates than beams: opera_fast's first step,
    or an EOS among its candidates) feed that token: the cache always holds the emitted tokens."""
    engine = tiny_engine("llava")
    prompt = "describe the image in detail please"
    args = {"beams": 3, "num_attn_candidates": 2}
    if case == "huge_scale":
        args["scale_factor"] = 1e30
    elif case == "inf_penalty":  # every candidate at -inf on steps 3 and 4
        real = opera_module.penalty

        def crafted(log_scores, image_mass, n_response, weight):
            pen, loc = real(log_scores, image_mass, n_response, weight)
            return (torch.full_like(pen, torch.inf) if n_response in (4, 5) else pen), loc

        monkeypatch.setattr(opera_module, "penalty", crafted)
    else:
        args = dict(resolve("opera_fast").args)
    want = {"huge_scale": {0, 10, 11, 12}, "inf_penalty": {0, 3, 4}, "fast": {0}}.get(case)
    if case == "fast_eos":  # beam 0's candidate at step 2 of the plain run is an EOS
        trace: list = []
        engine.generate(images[0], prompt, method=opera(trace=trace, **args), max_new_tokens=6)
        eos = int(next(s for s in trace if s.get("t") == 2)["candidates"][0, 0])
        monkeypatch.setattr(engine, "eos_ids", [eos])
    trace = []
    engine.generate(images[0], prompt, method=opera(trace=trace, **args), max_new_tokens=14)
    if case == "fast_eos":  # one candidate per beam: the beam whose candidate ended needs a filler
        want = {0, next(s["t"] for s in trace if "t" in s and (s["candidates"] == eos).any())}
    assert want <= set(filler_steps(trace)), filler_steps(trace)
    assert_caches_hold_emitted_tokens(engine, images[0], prompt, trace)


def test_rollback_target_rule():
    history = torch.tensor([[12, 12, 12, 3], [12, 12, 5, 12]])
    assert rollback_target(history, 12, threshold=2)
    assert not rollback_target(history, 12, threshold=3)  # beam 0 has it 3 times, not > 3
    assert not rollback_target(torch.full((2, 40), 9), 9, threshold=2)  # columns < 10 never


def test_rollback_position_rule():
    """``(counted, restore)`` for a rollback to column ``loc`` while deciding token
    ``n_response - 1``: loc + 1, then loc once loc + 1 is used up, then none; the restored token
    is at most ``window`` tokens back (the window's first token: n_response - 1 - window) and at
    most the previous token."""
    assert rollback_position(20, 40, {}, limit=2, window=512) == (21, 21)
    assert rollback_position(20, 40, {21: 1}, limit=2, window=512) == (21, 21)
    assert rollback_position(20, 40, {21: 2}, limit=2, window=512) == (20, 20)
    assert rollback_position(20, 40, {21: 2, 20: 2}, limit=2, window=512) is None
    # the window edge: token 39 is decided, so window w reaches back to token 39 - w
    assert rollback_position(20, 40, {}, limit=2, window=19) == (21, 21)
    assert rollback_position(20, 40, {}, limit=2, window=18) == (21, 21)
    assert rollback_position(20, 40, {}, limit=2, window=17) == (21, 22)
    assert rollback_position(20, 40, {}, limit=2, window=5) == (21, 34)
    assert rollback_position(20, 40, {21: 2}, limit=2, window=5) == (20, 34)
    assert rollback_position(20, 40, {}, limit=2, window=1) == (21, 38)
    # never later than the previous token
    assert rollback_position(38, 40, {}, limit=2, window=512) == (39, 38)


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


@pytest.mark.parametrize("window, restore", [(2, 12), (1, 13)])
def test_rollback_goes_at_most_window_tokens_back(summary_column, images, window, restore):
    """The summary column (10) first recurs more than 3 times in every beam while token 14 is
    decided: the rollback to position 11 is cut to 14 - window, every time."""
    engine = tiny_engine("llava")
    trace: list = []
    engine.generate(images[0], "describe the image in detail please",
                    method=opera(trace=trace, beams=2, num_attn_candidates=2, threshold=3,
                                 window=window), max_new_tokens=24)
    first = next(i for i, s in enumerate(trace) if "rollback_to" in s)
    assert trace[first - 1]["t"] == 14
    assert {s["rollback_to"] for s in trace if "rollback_to" in s} == {restore}


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
