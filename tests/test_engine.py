"""The engine against transformers' own generate, and batch invariance, on every tiny arch."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_engine
from veridical.decoding.inputs import encode
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
