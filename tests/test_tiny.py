"""Tiny models build, generate, batch with left padding, and round-trip through a folder."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText

from veridical.processing import load_processor
from veridical.tiny import _BUILDERS, ARCHS, build_tiny, save_tiny


def _image(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def _prompt(processor, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _inputs(processor, text: str = "Is there a dog in the image?"):
    return processor(
        images=_image((48, 40), (200, 30, 60)), text=_prompt(processor, text), return_tensors="pt"
    )


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_archs_match_builders():
    assert tuple(_BUILDERS) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_build_and_generate(arch):
    model, processor = build_tiny(arch)
    assert not model.training
    tokenizer = processor.tokenizer
    text_config = model.config.get_text_config()
    assert text_config.num_key_value_heads < text_config.num_attention_heads  # GQA path
    assert None not in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id

    inputs = _inputs(processor)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens > 1
    out = model.generate(**inputs, do_sample=False, max_new_tokens=5)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 5) or out[0, -1] == tokenizer.eos_token_id
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert int(out.max()) < len(tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_fixes_weights_and_leaves_global_rng(arch):
    state = torch.get_rng_state()
    a, _ = build_tiny(arch, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = build_tiny(arch, seed=3)
    c, _ = build_tiny(arch, seed=4)
    assert _weights_equal(a, b)
    assert not _weights_equal(a, c)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_give_identical_logits(arch, tmp_path):
    model, processor = build_tiny(arch, seed=1)
    save_tiny(arch, tmp_path, seed=1)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reprocessor = load_processor(tmp_path)
    assert type(reloaded) is type(model)

    inputs, reinputs = _inputs(processor), _inputs(reprocessor)
    assert inputs.keys() == reinputs.keys()
    for key in inputs:
        assert torch.equal(inputs[key], reinputs[key]), key
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = reloaded(**reinputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_single_runs(arch):
    model, processor = build_tiny(arch)
    processor.tokenizer.padding_side = "left"
    images = [_image((48, 40), (200, 30, 60)), _image((64, 32), (10, 130, 60))]
    texts = ["Is there a dog?", "Please describe the image in detail with one short sentence."]
    prompts = [_prompt(processor, t) for t in texts]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding, lengths differ

    # First-step logits of the padded batch equal those of each prompt run alone.
    greedy = {"do_sample": False, "max_new_tokens": 4, "output_logits": True}
    out = model.generate(**batch, **greedy, return_dict_in_generate=True)
    for i in range(2):
        single = processor(images=images[i], text=prompts[i], return_tensors="pt")
        single_out = model.generate(**single, **greedy, return_dict_in_generate=True)
        new_tokens = out.sequences[i, batch["input_ids"].shape[1] :]
        assert torch.equal(new_tokens, single_out.sequences[0, single["input_ids"].shape[1] :])
        torch.testing.assert_close(out.logits[0][i], single_out.logits[0][0], rtol=0, atol=1e-4)


def test_dtype_is_applied():
    model, _ = build_tiny("llava", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_arch_names_supported_ones():
    with pytest.raises(ValueError, match="did you mean 'llava-next'.*qwen3-vl-moe"):
        build_tiny("llava_next")
    with pytest.raises(ValueError, match="arch='gpt'"):
        build_tiny("gpt")


def test_unknown_words_map_to_unk():
    _, processor = build_tiny("qwen2-vl")
    tokenizer = processor.tokenizer
    ids = tokenizer("Frobnicate the DOG", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.unk_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["the", "dog"]


def test_moe_router_top_k():
    model, _ = build_tiny("qwen3-vl-moe")
    router = model.model.language_model.layers[0].mlp.gate
    assert (router.top_k, router.num_experts) == (2, 4)


def test_load_processor_errors_on_folder_without_processor(tmp_path):
    with pytest.raises(FileNotFoundError, match="no processor files"):
        load_processor(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_processor(tmp_path / "missing")


def test_load_processor_builds_image_only_qwen_when_video_processor_fails(tmp_path):
    # A real Qwen folder names a video processor; without torchvision AutoProcessor raises
    # ImportError for it (with torchvision it loads normally), and both must give a processor.
    save_tiny("qwen2.5-vl", tmp_path)
    video_config = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 8}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    processor = load_processor(tmp_path)
    assert isinstance(processor, transformers.Qwen2_5_VLProcessor)
    _, built = build_tiny("qwen2.5-vl")
    assert torch.equal(_inputs(processor)["input_ids"], _inputs(built)["input_ids"])
