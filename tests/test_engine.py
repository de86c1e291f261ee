"""The engine against transformers' own generate, and batch invariance, on every tiny arch."""

from __future__ import annotations

import math

import pytest
import torch

import veridical
from tests.conftest import tiny_engine
from veridical import DecodingConfig, TokenEvent
from veridical.decoding.inputs import encode
from veridical.decoding.registry import resolve
from veridical.tiny import ARCHS


def hf_tokens(engine, image, prompt, **kwargs) -> list[int]:
    inputs = encode(engine.processor, image, prompt)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, **kwargs)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def trim(tokens: list[int], engine) -> list[int]:
    """HF output up to and including the first EOS (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in engine.eos_ids:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate(arch, images, prompts):
    engine = tiny_engine(arch)
    for image, prompt in zip(images, prompts):
        ours = engine.generate(image, prompt, max_new_tokens=12)
        theirs = hf_tokens(engine, image, prompt, do_sample=False, max_new_tokens=12)
        assert ours.token_ids == trim(theirs, engine)
        assert ours.completion_tokens == len(ours.token_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_alone_greedy_and_sampling(arch, images, prompts):
    engine = tiny_engine(arch)
    alone = [engine.generate(i, p, max_new_tokens=10).token_ids for i, p in zip(images, prompts)]
    batch = engine.generate(images, prompts, max_new_tokens=10)
    assert [r.token_ids for r in batch] == alone
    assert len({len(r.token_ids) for r in batch}) >= 1
    kw = dict(do_sample=True, temperature=0.9, top_p=0.9, top_k=50, max_new_tokens=10)
    seeds = [11, 12, 13, 14]
    alone = [
        engine.generate(i, p, seed=s, **kw).token_ids for i, p, s in zip(images, prompts, seeds)
    ]
    batch = engine.generate(images, prompts, seed=seeds, **kw)
    assert [r.token_ids for r in batch] == alone


def test_prompt_and_image_token_counts(images, prompts):
    engine = tiny_engine("llava")
    result = engine.generate(images[0], prompts[0], max_new_tokens=3)
    inputs = encode(engine.processor, images[0], prompts[0])
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    image_id = engine.model.config.image_token_id
    assert result.image_tokens == int((inputs["input_ids"] == image_id).sum()) > 1


def test_sampling_depends_only_on_seed(images, prompts):
    engine = tiny_engine("llava")
    kw = dict(do_sample=True, temperature=1.5, max_new_tokens=12)
    a = engine.generate(images[0], prompts[0], seed=5, **kw).token_ids
    b = engine.generate(images[0], prompts[0], seed=5, **kw).token_ids
    c = engine.generate(images[0], prompts[0], seed=6, **kw).token_ids
    assert a == b
    assert a != c
    greedy = engine.generate(images[0], prompts[0], max_new_tokens=12).token_ids
    assert a != greedy


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_equals_hf(images, prompts, length_penalty):
    engine = tiny_engine("llava")
    for image, prompt in zip(images[:2], prompts[:2]):
        ours = engine.generate(image, prompt, num_beams=3, max_new_tokens=10,
                               length_penalty=length_penalty)
        theirs = hf_tokens(engine, image, prompt, do_sample=False, num_beams=3,
                           max_new_tokens=10, length_penalty=length_penalty)
        assert ours.token_ids == trim(theirs, engine)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_with_eos_hits_equals_hf(images, prompts, early_stopping, length_penalty):
    """Make a frequent token EOS so that hypotheses finish early and the heuristics matter."""
    engine = tiny_engine("llava")
    greedy = engine.generate(images[0], prompts[0], max_new_tokens=12).token_ids
    saved_ids, saved_gen = engine.eos_ids, engine.model.generation_config.eos_token_id
    eos = sorted({greedy[3], greedy[-1]})
    kw = dict(num_beams=4, max_new_tokens=12, early_stopping=early_stopping,
              length_penalty=length_penalty)
    try:
        engine.eos_ids = eos
        engine.model.generation_config.eos_token_id = eos
        for image, prompt in zip(images, prompts):
            ours = engine.generate(image, prompt, **kw)
            theirs = hf_tokens(engine, image, prompt, do_sample=False, **kw)
            assert ours.token_ids == trim(theirs, engine)
            assert ours.finish_reason == ("stop" if ours.token_ids[-1] in eos else "length")
        batch = engine.generate(images, prompts, **kw)
        alone = [engine.generate(i, p, **kw).token_ids for i, p in zip(images, prompts)]
        assert [r.token_ids for r in batch] == alone
        if length_penalty == 0.0:  # without length normalisation short finished beams win
            assert any(r.finish_reason == "stop" for r in batch)
    finally:
        engine.eos_ids = saved_ids
        engine.model.generation_config.eos_token_id = saved_gen


def test_greedy_with_eos_stops_and_batch_rows_finish_at_different_steps(images, prompts):
    engine = tiny_engine("qwen2-vl")
    free = [engine.generate(i, p, max_new_tokens=12).token_ids for i, p in zip(images, prompts)]
    saved = engine.eos_ids
    try:
        engine.eos_ids = [free[0][4]]
        batch = engine.generate(images, prompts, max_new_tokens=12)
        alone = [engine.generate(i, p, max_new_tokens=12) for i, p in zip(images, prompts)]
    finally:
        engine.eos_ids = saved
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert batch[0].token_ids == free[0][:5] and batch[0].finish_reason == "stop"
    assert len({len(r.token_ids) for r in batch}) > 1  # rows left the batch at different steps


def test_stop_strings_cut_text(images, prompts):
    engine = tiny_engine("llava")
    full = engine.generate(images[0], prompts[0], max_new_tokens=12)
    words = full.text.split()
    stop = words[3]
    result = engine.generate(images[0], prompts[0], max_new_tokens=12, stop=[stop, "zzzz"])
    assert result.finish_reason == "stop"
    assert stop not in result.text
    assert full.text.startswith(result.text.strip())
    assert len(result.token_ids) < len(full.token_ids)


def test_text_only_request_on_a_vision_model(prompts):
    engine = tiny_engine("qwen2-vl")
    result = engine.generate(None, prompts[0], max_new_tokens=5)
    assert result.image_tokens == 0 and len(result.token_ids) == 5
    theirs = hf_tokens(engine, None, prompts[0], do_sample=False, max_new_tokens=5)
    assert result.token_ids == trim(theirs, engine)


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
def test_text_only_models_equal_hf_generate(arch, prompts):
    engine = tiny_engine(arch)
    for prompt in prompts[:2]:
        ours = engine.generate(None, prompt, max_new_tokens=8)
        assert ours.token_ids == trim(
            hf_tokens(engine, None, prompt, do_sample=False, max_new_tokens=8), engine
        )
    batch = engine.generate(None, prompts, max_new_tokens=8)
    assert [r.token_ids for r in batch] == [
        engine.generate(None, p, max_new_tokens=8).token_ids for p in prompts
    ]


def test_logprobs_equal_hf_logits_and_are_batch_invariant(images, prompts):
    engine = tiny_engine("llava")
    for do_sample in (False, True):
        kw = dict(max_new_tokens=6, do_sample=do_sample, temperature=0.7, seed=5)
        ours = engine.generate(images[1], prompts[1], logprobs=3, **kw)
        inputs = encode(engine.processor, images[1], prompts[1])
        with torch.inference_mode():  # the raw logits: the scores before temperature
            out = engine.model.generate(**inputs, max_new_tokens=len(ours.token_ids),
                                        min_new_tokens=len(ours.token_ids), do_sample=False,
                                        output_logits=True, return_dict_in_generate=True)
        # HF greedy only matches our sampled tokens in the first step; feed ours instead:
        ids = torch.cat([inputs["input_ids"], torch.tensor([ours.token_ids])], dim=1)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            logits = engine.model(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits
        n = len(ours.token_ids)
        logp = torch.log_softmax(logits[0, -n - 1 : -1].float(), -1)
        assert len(ours.logprobs) == n
        for step, entry in enumerate(ours.logprobs):
            assert entry.token_id == ours.token_ids[step]
            assert entry.logprob == pytest.approx(logp[step, entry.token_id].item(), abs=1e-4)
            top = logp[step].topk(3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        if not do_sample:
            assert all(e.top[0][0] == e.token_id for e in ours.logprobs)
            first = torch.log_softmax(out.logits[0][0].float(), -1)
            assert ours.logprobs[0].logprob == pytest.approx(first.max().item(), abs=1e-4)
        batch = engine.generate(images, prompts, logprobs=3, **{**kw, "seed": [5] * 4})
        assert batch[1].token_ids == ours.token_ids
        assert [e.logprob for e in batch[1].logprobs] == pytest.approx(
            [e.logprob for e in ours.logprobs], abs=1e-5)
    assert engine.generate(images[0], prompts[0], max_new_tokens=3).logprobs is None


def test_logprobs_refused_with_beams_and_search_methods(images, prompts):
    engine = tiny_engine("llava")
    with pytest.raises(veridical.InputError, match="num_beams=1"):
        engine.generate(images[0], prompts[0], num_beams=2, logprobs=0)
    with pytest.raises(veridical.InputError, match="opera"):
        engine.generate(images[0], prompts[0], method="opera", logprobs=0)
    with pytest.raises(veridical.InputError, match="logprobs=21"):
        engine.generate(images[0], prompts[0], logprobs=21)


def test_ignore_eos_decodes_max_new_tokens_and_is_refused_with_searches(images, prompts):
    from veridical.bench import bench_images

    engine = veridical.load("builtin:synthcoco-llava")  # answers yes/no questions in 2 tokens
    image, prompt = bench_images(1)[0], "is there a cup in the image ?"
    short = engine.generate(image, prompt, max_new_tokens=6)
    assert short.finish_reason == "stop" and short.token_ids[-1] in engine.eos_ids
    assert len(short.token_ids) < 6
    long = engine.generate(image, prompt, max_new_tokens=6, ignore_eos=True)
    assert long.finish_reason == "length" and len(long.token_ids) == 6
    assert long.token_ids[: len(short.token_ids)] == short.token_ids  # the same steps, then on
    tiny = tiny_engine("llava")
    with pytest.raises(veridical.InputError, match="num_beams=1"):
        tiny.generate(images[0], prompts[0], num_beams=2, ignore_eos=True)
    with pytest.raises(veridical.InputError, match="ignore_eos is not available with 'opera'"):
        tiny.generate(images[0], prompts[0], method="opera", ignore_eos=True)
    with pytest.raises(veridical.InputError, match="ignore_eos=1"):
        tiny.generate(images[0], prompts[0], ignore_eos=1)


def test_on_token_streams_each_token_and_can_cancel_one_request(images, prompts):
    engine = tiny_engine("qwen2-vl")
    method = resolve("none")
    config = DecodingConfig(max_new_tokens=8)
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(images, prompts))]
    seen: dict[int, list[int]] = {r: [] for r in range(4)}

    def record(request: int, token: int, logprob) -> bool:
        assert logprob is None  # no logprobs asked for
        seen[request].append(token)
        return not (request == 2 and len(seen[request]) == 3)  # request 2 hangs up

    results = engine.run(requests, method, config, [None] * 4, on_token=record)
    alone = [engine.generate(i, p, max_new_tokens=8) for i, p in zip(images, prompts)]
    for r in (0, 1, 3):
        assert seen[r] == results[r].token_ids == alone[r].token_ids
    assert results[2].finish_reason == "cancelled"
    assert results[2].token_ids == seen[2] == alone[2].token_ids[:3]
    # beam search knows its tokens only at the end: they still all reach the callback, in order
    seen = {r: [] for r in range(4)}
    beams = engine.run(requests, method, DecodingConfig(max_new_tokens=5, num_beams=2),
                       [None] * 4, on_token=record)
    assert [seen[r] for r in range(4)] == [b.token_ids for b in beams]


# Continuous batching: requests joining a running batch (``admit``), answers as rows finish ----
JOIN_METHODS = [("none", None), ("vcd", None), ("m3id", None), ("vhr", None), ("pai", None),
                ("var", {"sink_dims": "3,7", "tau": 10.0, "summ": 0.01})]


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("method,args", JOIN_METHODS)
def test_requests_joining_a_running_batch_give_their_tokens_alone(arch, method, args, images,
                                                                  prompts):
    # vcd: a branch per request; m3id: a rule that depends on the request's own step; vhr:
    # per-request state from its own forwards; pai: an edit on the real rows only, beside an
    # unedited text-only branch; var: per-key state written by hooks
    engine = tiny_engine(arch)
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(images, prompts))]
    config = DecodingConfig(max_new_tokens=8)
    alone = [engine.run([r], resolve(method, args), config, [n])[0]
             for n, r in enumerate(requests)]
    waiting = [(r, n) for n, r in enumerate(requests) if n > 0]  # (request, its seed)
    live: list[int] = []

    def admit(n_live: int) -> list:
        live.append(n_live)
        take = {1: 1, 3: 2, 6: 1}.get(len(live), 0)  # before steps 0, 2 and 5 of request 0
        new = waiting[:take]
        del waiting[:take]
        return new

    done: dict[int, object] = {}
    results = engine.run(requests[:1], resolve(method, args), config, [0],
                         on_done=lambda i, r: done.setdefault(i, r), admit=admit)
    assert not waiting and live[:6] == [1, 2, 2, 4, 4, 4]
    assert [r.seed for r in results] == [0, 1, 2, 3]
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert [r.prompt_tokens for r in results] == [a.prompt_tokens for a in alone]
    assert done == dict(enumerate(results))  # each answered once, with its result


@pytest.mark.parametrize("first_has_image", [True, False])
def test_fia_requests_with_and_without_an_image_join_each_other(first_has_image, images, prompts):
    # fia's per-request selection has one column per image token, or one for a text-only request
    engine = tiny_engine("llava")
    pictures = [images[0], None, images[2], None] if first_has_image else \
        [None, images[1], None, images[3]]
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(pictures, prompts))]
    config = DecodingConfig(max_new_tokens=6)
    alone = [engine.run([r], resolve("fia"), config, [None])[0] for r in requests]
    waiting = [(r, None) for r in requests[1:]]
    joined = engine.run(requests[:1], resolve("fia"), config, [None],
                        admit=lambda n: [waiting.pop(0)] if waiting else [])
    assert not waiting
    assert [r.token_ids for r in joined] == [a.token_ids for a in alone]


def test_sampled_requests_joining_a_running_batch_draw_from_their_own_seeds(images, prompts):
    engine = tiny_engine("qwen2-vl")
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(images, prompts))]
    config = DecodingConfig(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9)
    seeds = [11, 12, 13, 14]
    alone = [engine.run([r], resolve("vcd"), config, [s])[0] for r, s in zip(requests, seeds)]
    waiting = list(zip(requests[2:], seeds[2:]))
    joined = engine.run(requests[:2], resolve("vcd"), config, seeds[:2],
                        admit=lambda n: [waiting.pop(0)] if waiting and n < 4 else [])
    assert [r.token_ids for r in joined] == [a.token_ids for a in alone]


def test_on_done_answers_each_request_when_its_row_finishes(images, prompts):
    engine = tiny_engine("qwen2-vl")
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(images, prompts))]
    free = [engine.generate(i, p, max_new_tokens=12).token_ids for i, p in zip(images, prompts)]
    events: list[tuple[str, int]] = []
    saved = engine.eos_ids
    try:
        engine.eos_ids = [free[0][2]]  # request 0 ends after 3 tokens
        results = engine.run(requests, resolve("none"), DecodingConfig(max_new_tokens=12),
                             [None] * 4,
                             on_token=lambda r, t, lp: events.append(("token", r)) or True,
                             on_done=lambda r, result: events.append(("done", r)))
    finally:
        engine.eos_ids = saved
    assert results[0].finish_reason == "stop" and len(results[0].token_ids) == 3
    answered = events.index(("done", 0))
    later = events[answered + 1:]
    assert ("token", 0) not in later and any(kind == "token" for kind, _ in later)
    assert sorted(r for kind, r in events if kind == "done") == [0, 1, 2, 3]


def test_requests_waiting_when_the_whole_batch_finishes_still_run(images, prompts):
    engine = tiny_engine("llava")
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(images, prompts))]
    config = DecodingConfig(max_new_tokens=2)  # every row ends at the same step
    waiting = [(r, n) for n, r in enumerate(requests) if n >= 2]  # (request, its seed)
    asked: list[int] = []

    def admit(n_live: int) -> list:
        asked.append(n_live)
        if n_live:
            return []
        new = waiting[:1]
        del waiting[:1]
        return new

    results = engine.run(requests[:2], resolve("vcd"), config, [0, 1], admit=admit)
    alone = [engine.run([r], resolve("vcd"), config, [n])[0] for n, r in enumerate(requests)]
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert asked == [2, 2, 0, 1, 0, 1, 0]  # the drained batch asked, one at a time


def test_beam_search_search_methods_and_hooked_preparing_methods_take_no_newcomers(images,
                                                                                  prompts):
    engine = tiny_engine("llava")
    request = engine.request(images[0], prompts[0], 0)

    def never(n_live: int) -> list:
        raise AssertionError("admit was called")

    engine.run([request], resolve("none"), DecodingConfig(max_new_tokens=3, num_beams=2), [None],
               admit=never)
    engine.run([request], resolve("opera_fast"), DecodingConfig(max_new_tokens=3), [None],
               admit=never)
    # var's hooks would see vhr's own forwards for a newcomer
    engine.run([request], resolve("var+vhr", {"sink_dims": "3,7"}),
               DecodingConfig(max_new_tokens=3), [None], admit=never)
    asked: list[int] = []
    engine.run([request], resolve("var", {"sink_dims": "3,7"}), DecodingConfig(max_new_tokens=3),
               [None], admit=lambda n: asked.append(n) or [])
    assert asked == [1, 1, 1, 0]  # before each step, and once the batch has drained


@pytest.mark.parametrize("method,beams", [("opera", 1), ("none", 3)])
def test_searches_see_cancellation_between_steps(method, beams, images, prompts):
    # beam search and OPERA send their tokens only at the end: a request cancelled while they
    # run (the server's disconnect) leaves at the next step, and the others decode on
    engine = tiny_engine("llava")
    requests = [engine.request(i, p, n) for n, (i, p) in enumerate(zip(images[:2], prompts[:2]))]
    config = DecodingConfig(max_new_tokens=6, num_beams=beams)
    alone = engine.run(requests[1:], resolve(method), config, [0])[0]
    stream = engine.stream(requests, resolve(method), config, [0, 0])
    stream.cancel(0)
    results = {e.request: e.result for e in stream if not isinstance(e, TokenEvent)}
    assert results[0].finish_reason == "cancelled" and len(results[0].token_ids) <= 1
    assert results[1].token_ids == alone.token_ids


def test_logprobs_leave_out_the_tokens_the_method_rules_out(images, prompts):
    engine = tiny_engine("llava")
    out = engine.generate(images[0], prompts[0], method="vcd", method_args={"beta": 1.0},
                          max_new_tokens=3, logprobs=5)
    # beta = 1 keeps only the most likely token: its alternatives are all cut (-inf)
    assert all(len(t.top) == 1 and t.top[0][0] == t.token_id for t in out.logprobs)
    assert all(math.isfinite(t.logprob) for t in out.logprobs)


# The context: prompt + image tokens + max_new_tokens within the model's positions -------------
def test_requests_must_fit_the_context_at_every_entry_point(images, prompts):
    engine = tiny_engine("llava")  # 512 positions
    assert engine.context_length == 512
    fits = engine.generate(images[0], prompts[0], max_new_tokens=1)
    room = 512 - fits.prompt_tokens
    with pytest.raises(veridical.InputError) as caught:
        engine.generate(images[0], prompts[0], max_new_tokens=room + 1)
    assert str(caught.value) == (
        f"request 0: this model's context is 512 tokens, but the request needs 513: "
        f"{fits.prompt_tokens} prompt tokens ({fits.image_tokens} of them for the image) + "
        f"max_new_tokens {room + 1}; lower max_new_tokens or shorten the prompt")
    # a batch names the request; a branch's rows must fit too (icd's role is a longer prompt)
    with pytest.raises(veridical.InputError, match="^request 1: .* 513"):
        engine.generate([None, images[0]], ["dog", prompts[0]], max_new_tokens=room + 1)
    with pytest.raises(veridical.InputError, match=r"^request 0 \(disturbed branch\): "):
        engine.generate(images[0], prompts[0], method="icd", max_new_tokens=room)
    # beam search and search methods: the same check
    for method, beams in (("none", 2), ("opera_fast", 1)):
        with pytest.raises(veridical.InputError, match="lower max_new_tokens"):
            engine.generate(images[0], prompts[0], method=method, num_beams=beams,
                            max_new_tokens=room + 1)
    # a request that joins a running batch is checked before it is prefilled
    waiting = [(engine.request(None, "dog " * 600), 0)]
    with pytest.raises(veridical.InputError, match="^request 1: .* 605 prompt tokens"):
        engine.run([engine.request(images[0], prompts[0])], resolve("none"),
                   DecodingConfig(max_new_tokens=4), [0],
                   admit=lambda n: [waiting.pop()] if waiting else [])


def test_a_request_s_own_limit_ends_its_row_and_is_what_the_context_check_counts(images,
                                                                                  prompts):
    engine = tiny_engine("llava")
    long_prompt = "dog " * 480  # leaves fewer than 64 positions
    alone = engine.generate(None, long_prompt, max_new_tokens=4, ignore_eos=True)
    capped = veridical.Request(None, long_prompt, max_new_tokens=4)
    other = engine.request(images[0], prompts[0])
    config = DecodingConfig(max_new_tokens=64, ignore_eos=True)
    with pytest.raises(veridical.InputError, match="context is 512"):
        engine.run([veridical.Request(None, long_prompt), other], resolve("none"), config, [0, 0])
    results = engine.run([capped, other], resolve("none"), config, [0, 0])
    assert results[0].token_ids == alone.token_ids and results[0].finish_reason == "length"
    assert len(results[1].token_ids) == 64
    with pytest.raises(veridical.InputError, match="max_new_tokens=0 is invalid"):
        engine.run([veridical.Request(None, "dog", max_new_tokens=0)], resolve("none"), config,
                   [0])
