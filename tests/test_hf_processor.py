"""veridical.hf.logits_processor inside model.generate equals the engine (greedy)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_engine
from veridical.decoding.inputs import collate, encode
from veridical.errors import InputError
from veridical.hf import logits_processor


@pytest.mark.parametrize("arch,method,args", [
    ("llava", "vcd", {}), ("llava", "ritual+vcd", {}), ("qwen2-vl", "m3id", {"lam": 0.5}),
    ("llava", "icd", {"alpha": 2.0}), ("qwen3-vl-moe", "scmoe", {"early_stop": True}),
])
def test_generate_with_processor_equals_engine(arch, method, args, images, prompts):
    engine = tiny_engine(arch)
    ims, ps = images[:2], prompts[:2]
    ours = engine.generate(ims, ps, method=method, method_args=args, max_new_tokens=6)
    batch = collate([encode(engine.processor, i, p) for i, p in zip(ims, ps)], engine.pad_id)
    # the branches' randomness replayed from the seeds the engine's requests ran with
    lp = logits_processor(method, engine, {"images": ims, "prompts": ps},
                          seed=[r.seed for r in ours], **args)
    with torch.inference_mode():
        out = engine.model.generate(**batch, do_sample=False, max_new_tokens=6,
                                    logits_processor=[lp])
    theirs = out[:, batch["input_ids"].shape[1]:].tolist()
    assert [r.token_ids for r in ours] == theirs


def test_beam_search_is_refused_clearly(images, prompts):
    engine = tiny_engine("llava")
    inputs = encode(engine.processor, images[0], prompts[0])
    lp = logits_processor("vcd", engine, {"images": [images[0]], "prompts": [prompts[0]]})
    with pytest.raises(InputError, match="beam search .* not supported"):
        engine.model.generate(**inputs, num_beams=2, max_new_tokens=3, logits_processor=[lp])


def test_attention_edit_methods_are_refused(images, prompts):
    engine = tiny_engine("llava")
    with pytest.raises(InputError, match="edits attention.*use engine.generate"):
        logits_processor("pai", engine, {"images": [images[0]], "prompts": [prompts[0]]})


def test_search_methods_are_refused(images, prompts):
    engine = tiny_engine("llava")
    with pytest.raises(InputError, match="search strategy.*use engine.generate"):
        logits_processor("opera", engine, {"images": [images[0]], "prompts": [prompts[0]]})
