"""Training the built-in model organism, and the shipped model itself.

Fast tests train a very small LLaVA for a few steps on a tiny generated world; the shipped-model
tests load ``veridical/builtin/synthcoco-llava`` offline through both routes and check one
test-split answer (skipped when the model is not shipped in this checkout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from veridical.world.generate import BUILTIN_SEED, WorldConfig, build_world, generate_world
from veridical.world.train import (
    CAPTION_PROMPT,
    POPE_SUFFIX,
    Encoder,
    TrainConfig,
    build_model,
    draw_example,
    load_split,
    make_batch,
    normalize,
    train,
)

QUICK = WorldConfig(pope_images=10, mme_images_per_task=4)
# Small enough that a step takes milliseconds; the shipped recipe only changes these sizes.
TINY = TrainConfig(stage1_steps=4, stage1_batch=8, steps=24, batch=8, warmup=4, turns=2,
                   vision_layers=1, vision_hidden=32, text_layers=1, text_hidden=64, text_ffn=128,
                   log_every=4, eval_every=1000, checkpoint_every=1000, threads=1)
SHIPPED = Path(__file__).resolve().parent.parent / "veridical" / "builtin" / "synthcoco-llava"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, QUICK, 3, {"train": 40, "val": 12})
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("model")
    summary = train(world, out, TINY, progress=False)
    return out, summary


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_training_examples_tokenise_exactly_as_the_processor(world):
    model, processor = build_model(build_world(QUICK), TINY)
    split = load_split(world, "train")
    encoder = Encoder(processor, 3.0)
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):  # every drawn text is inside the vocabulary (Encoder raises otherwise)
        i, turns = draw_example(split, build_world(QUICK), TINY, rng)
        kinds.add("caption" if turns[0][0] == CAPTION_PROMPT else "qa")
        ids, weights = encoder.encode(turns)
        assert abs(sum(weights) - 1) < 1e-6
    assert kinds == {"caption", "qa"}
    image = Image.open(world / "images" / "train" / split.files[5])
    question = "Is there a fork in the image?" + POPE_SUFFIX
    # first turn: the processor's own tokens (image tokens expanded) and pixels
    ref = processor(text=[_prompt(processor, question)], images=[image], return_tensors="pt")
    ids, weights = encoder.encode([(question, "yes")])
    assert ids[:-2] == ref["input_ids"][0].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(ids[-2:]) == ["yes", "</s>"]
    assert weights[-2] == pytest.approx(0.75) and weights[-1] == pytest.approx(0.25)
    ip = processor.image_processor
    pixels = normalize(split.pixels[5:6], np.asarray(ip.image_mean), np.asarray(ip.image_std))
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-5, rtol=0)
    # a whole conversation: the chat template's tokens
    turns = [(question, "yes"), ("Is there only one car in this image?", "no")]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][0]}]},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": [{"type": "text", "text": turns[1][0]}]},
                {"role": "assistant", "content": "no"}]
    text = processor.apply_chat_template(messages, tokenize=False)
    ref = processor(text=[text], images=[image], return_tensors="pt")
    assert encoder.encode(turns)[0] == ref["input_ids"][0].tolist()


def test_early_steps_use_the_early_caption_share(world):
    cfg = dataclasses.replace(TINY, caption_share=1.0, early_steps=3, early_caption_share=0.0)
    assert [cfg.caption_share_at(s) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    split, w = load_split(world, "train"), build_world(QUICK)
    rng = np.random.default_rng(0)
    early = [draw_example(split, w, cfg, rng, step=2)[1][0][0] for _ in range(20)]
    late = [draw_example(split, w, cfg, rng, step=3)[1][0][0] for _ in range(20)]
    assert CAPTION_PROMPT not in early and set(late) == {CAPTION_PROMPT}
    with pytest.raises(ValueError, match="early_caption_share"):
        TrainConfig(early_caption_share=1.5)
    with pytest.raises(ValueError, match="early_steps"):
        TrainConfig(early_steps=-1)
    # two learning-rate cycles: warm-up + cosine over steps 0..3, then again over 4..9
    two = TrainConfig(steps=10, warmup=2, early_steps=4, early_restart=True)
    one = TrainConfig(steps=10, warmup=2)
    assert [round(two.lr_scale(s), 4) for s in range(10)] == [
        0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464]
    assert [round(one.lr_scale(s), 4) for s in range(4)] == [0.5, 1.0, 1.0, 0.9619]
    with pytest.raises(ValueError, match="early_restart needs"):
        TrainConfig(steps=10, early_steps=10, early_restart=True)


def _negatives(split, w, cfg, n=60) -> list[tuple[set[str], str]]:
    """(present categories, asked category) of every "no" existence turn in n drawn examples."""
    rng, out = np.random.default_rng(1), []
    for _ in range(n):
        i, turns = draw_example(split, w, cfg, rng)
        for question, answer in turns:
            m = re.match(r"Is there an? (.+?) in (the|this) image\?", question)
            if m and answer == "no":
                out.append(({o.category for o in split.layouts[i].objects}, m.group(1)))
    return out


def test_partner_negative_share_asks_absent_partners(world):
    split, w = load_split(world, "train"), build_world(QUICK)
    base = dataclasses.replace(TINY, caption_share=0.0, existence_share=1.0, turns=4)

    def absent_partners(present: set[str]) -> set[str]:
        return {w.partner(c) for c in present if any(c in p for p in w.pairs)} - present

    hard = _negatives(split, w, dataclasses.replace(base, partner_negative_share=1.0))
    with_partner = [(p, asked) for p, asked in hard if absent_partners(p)]
    assert len(with_partner) > 20
    assert all(asked in absent_partners(p) for p, asked in with_partner)
    assert all(asked not in p for p, asked in hard)
    # the default draws random absent categories, mostly not partners
    easy = _negatives(split, w, base)
    assert all(asked not in p for p, asked in easy)
    assert sum(asked in absent_partners(p) for p, asked in easy) < len(easy) / 2
    with pytest.raises(ValueError, match="partner_negative_share"):
        TrainConfig(partner_negative_share=-0.1)


def test_answer_loss_only_and_batches_depend_only_on_seed_and_step(world):
    _, processor = build_model(build_world(QUICK), TINY)
    split = load_split(world, "train")
    encoder = Encoder(processor, 3.0)
    ip = processor.image_processor
    mean, std = np.asarray(ip.image_mean), np.asarray(ip.image_std)

    def batch(step: int):
        rng = np.random.default_rng([TINY.seed, 2, step])
        return make_batch(encoder, [draw_example(split, build_world(QUICK), TINY, rng)
                                    for _ in range(6)], split.pixels, mean, std)

    a, b = batch(3), batch(3)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], batch(4)["input_ids"])
    # weights only on answer tokens (after "assistant :"), one unit per example
    torch.testing.assert_close(a["weights"].sum(1), torch.ones(6))
    image_id = processor.tokenizer.image_token_id
    assert (a["weights"][a["input_ids"] == image_id] == 0).all()
    assert (a["weights"][a["attention_mask"] == 0] == 0).all()


def test_few_steps_lower_the_loss_and_save_reloads_both_routes(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import veridical

    out, summary = trained
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    stage2 = [r["loss"] for r in log if r["stage"] == 2 and "loss" in r]
    assert stage2[-1] < stage2[0] - 0.3  # an EMA of the batch losses, from ln(vocab)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()
    assert summary["config"] == dataclasses.asdict(TINY)

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert model.config.text_config._attn_implementation == "eager"
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.text_config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.bos_token_id == tok.bos_token_id
    image = Image.new("RGB", (64, 64), (120, 160, 190))
    prompt = _prompt(processor, "Is there a bird in the image?" + POPE_SUFFIX)
    enc = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=5, do_sample=False)
    engine = veridical.load(str(out))
    got = engine.generate(image, "Is there a bird in the image?" + POPE_SUFFIX, max_new_tokens=5)
    assert got.token_ids == ref[0, enc["input_ids"].shape[1]:].tolist()[:len(got.token_ids)]


def test_bf16_runs_the_forwards_in_bfloat16_and_trains(world, trained, tmp_path, monkeypatch):
    from veridical.world import train as synthcoco_train

    seen = []
    real = synthcoco_train.weighted_loss

    def record(logits, *args):
        seen.append(logits.dtype)
        return real(logits, *args)

    monkeypatch.setattr(synthcoco_train, "weighted_loss", record)
    summary = train(world, tmp_path, dataclasses.replace(TINY, bf16=True), progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    final = summary["final"]
    assert math.isfinite(final["stage2_loss_ema"]) and math.isfinite(final["stage1_loss_ema"])
    # the saved weights stay fp32, and the bf16 run learned about as much as the fp32 one
    assert _weights_dtype(tmp_path) == {torch.float32}
    assert final["stage2_loss_ema"] < 1.5 * trained[1]["final"]["stage2_loss_ema"]


def _weights_dtype(path: Path) -> set:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(path / "model.safetensors").values()}


def test_a_crashed_run_resumes_to_the_same_weights(world, trained, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from veridical.world import train as synthcoco_train

    cfg = dataclasses.replace(TINY, checkpoint_every=5)
    real = synthcoco_train.weighted_loss
    calls = {"n": 0}

    def crash_at_step_13(*args):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synthcoco_train, "weighted_loss", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(world, tmp_path, cfg, progress=False)
    assert (tmp_path / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(synthcoco_train, "weighted_loss", real)
    train(world, tmp_path, cfg, progress=False)  # resumes from step 10
    resumed = load_file(tmp_path / "model.safetensors")
    straight = load_file(trained[0] / "model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4)


def test_stop_after_then_longer_run_records_the_schedule_change(world, tmp_path):
    cfg = dataclasses.replace(TINY, steps=12)
    assert train(world, tmp_path, cfg, progress=False, stop_after=8)["stopped_at_step"] == 8
    assert (tmp_path / "checkpoint" / "state.pt").is_file()
    assert (tmp_path / "model.safetensors").is_file()  # the model as of step 8
    with pytest.raises(ValueError, match="may only change --steps"):
        train(world, tmp_path, dataclasses.replace(cfg, lr=5e-3), progress=False)
    summary = train(world, tmp_path, dataclasses.replace(cfg, steps=16), progress=False)
    assert summary["schedule_changes"] == [{"at_step": 8, "steps_before": 12, "steps_after": 16}]
    assert summary["stopped_at_step"] is None and not (tmp_path / "checkpoint").exists()
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == 2 and "loss" in r] == [4, 8, 12, 16]


def test_world_train_cli_is_registered():
    from veridical.cli import build_parser

    args = build_parser().parse_args(["world", "train", "--out", "x", "--steps", "7", "--tower-lr", "0"])
    assert args.steps == 7 and args.tower_lr == 0.0 and args.func.__name__ == "cmd_world_train"
    assert args.early_restart is None  # not given: TrainConfig's default applies
    flags = build_parser().parse_args(["world", "train", "--out", "x", "--early-restart"])
    assert flags.early_restart is True


# ---------------------------------------------------------------------------- shipped model

shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                             reason="the built-in model is not shipped in this checkout")

# A test-split image and question the shipped model answers correctly under greedy decoding
# (chosen once, after training; the image is regenerated from the world seed).
TEST_INDEX = 0
TEST_QUESTION = "Is there a {} in the image?" + POPE_SUFFIX


@pytest.fixture(scope="module")
def test_image(tmp_path_factory) -> tuple[Image.Image, set[str]]:
    out = tmp_path_factory.mktemp("testsplit")
    generate_world(out, WorldConfig(pope_images=0, mme_images_per_task=0), BUILTIN_SEED,
                   {"test": TEST_INDEX + 1})
    inst = json.loads((out / "annotations" / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    present = {names[a["category_id"]] for a in inst["annotations"]
               if a["image_id"] == inst["images"][TEST_INDEX]["id"]}
    path = out / "images" / "test" / inst["images"][TEST_INDEX]["file_name"]
    return Image.open(path).convert("RGB"), present


@shipped
def test_shipped_model_loads_offline_through_both_routes(monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED)
    processor = AutoProcessor.from_pretrained(SHIPPED)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert (SHIPPED / "model.safetensors").stat().st_size <= 25 * 2**20
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id


@shipped
def test_shipped_model_answers_a_test_split_question(test_image, monkeypatch):
    import veridical

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image, present = test_image
    assert present == {"bird", "boat", "frisbee", "kite"}  # test image 0 of the shipped world
    engine = veridical.load("builtin:synthcoco-llava")
    answer = {obj: engine.generate(image, TEST_QUESTION.format(obj), max_new_tokens=4).text
              for obj in ("bird", "car", "fork")}
    assert answer == {"bird": "yes", "car": "no", "fork": "no"}  # present / absent elsewhere
    caption = engine.generate(image, CAPTION_PROMPT, max_new_tokens=64).text
    assert caption.startswith("a photo of a beach showing")  # the right scene
    assert any(f" {o} " in f" {caption} " for o in present)  # and an object that is there
