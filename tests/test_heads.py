"""veridical.heads: the pure score functions on hand-built tensors, the profiler against direct
references computed here with our own hooks and eager attention, a planted massive-activation
dimension, the fingerprint cache, the model's profile (found by ``veridical.load``, built by
``ensure_profile``) and the ``heads profile`` CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import veridical
import veridical.heads.profile as heads_profile
from veridical.decoding.inputs import encode
from veridical.errors import InputError
from veridical.heads import (
    HEAD_SCORES,
    MODEL_PROFILE,
    calibration_images,
    ensure_profile,
    head_scores,
    load_or_profile,
    load_profile,
    model_fingerprint,
    model_profile_path,
    profile_model,
    save_model_profile,
    sink_dims,
)
from veridical.heads import scores as S
from veridical.heads.cli import main as heads_main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "veridical" / "builtin" / "synthcoco-llava" / MODEL_PROFILE
ARCHS = ("llava", "qwen2-vl")
PROMPT = "Please describe this image in detail."


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, above all on a CPU shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(seed: int, size=(40, 52)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


# ----------------------------------------------------------------------------- pure functions


def test_split_heads_and_norms():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 12)
    heads = S.split_heads(x, 3)
    assert heads.shape == (1, 3, 4)
    assert torch.equal(heads[0, 1], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    assert torch.allclose(S.head_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]])), torch.tensor([5.0, 0.0]))
    with pytest.raises(ValueError, match="num_heads"):
        S.split_heads(x, 5)


def test_vhd_is_norm_of_difference_not_difference_of_norms():
    a = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])  # (1, H=2, Dh=2)
    b = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert torch.allclose(S.vhd(a, b), torch.tensor([[math.sqrt(2.0), 5.0]]))
    with pytest.raises(ValueError, match="text_only"):
        S.vhd(a, b[..., :1])


def test_visual_sensitivity_is_relative_change():
    real = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    cf = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(S.visual_sensitivity(real, cf), torch.tensor([4.0 / 5.0, 0.0]))


def test_image_attention_share():
    row = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([False, True, True, False])
    assert torch.allclose(S.image_attention_share(row, mask), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="image_mask"):
        S.image_attention_share(row, mask.float())
    with pytest.raises(ValueError, match="keys"):
        S.image_attention_share(row, mask[:3])


def test_massive_activation_rule():
    assert S.effective_tau(20, 4096) == 20.0
    assert S.effective_tau(20, 8192) == 20.0
    assert S.effective_tau(20, 64) == pytest.approx(2.5)
    h = torch.full((3, 64), 0.01)
    h[1, 5] = 100.0  # token 1 carries a massive value in dim 5
    phi = S.rms_abs(h)
    assert phi[1, 5] == pytest.approx(8.0, rel=1e-3)  # at most sqrt(D)
    assert torch.equal(S.rms_abs(h, dims=torch.tensor([5, 0])), phi[:, [5, 0]])
    mask = S.massive_mask(phi, 2.5, 10.0)
    assert mask.nonzero().tolist() == [[1, 5]]
    counts = torch.tensor([[0, 2, 1], [0, 3, 1], [1, 1, 0]])  # (layers, dims)
    assert S.select_sink_dims(counts, 0.5) == [1, 2]
    assert S.select_sink_dims(counts, 1.0) == [1]
    with pytest.raises(ValueError, match="tau"):
        S.effective_tau(0, 64)
    with pytest.raises(ValueError, match="ratio"):
        S.massive_mask(phi, 2.5, 0.5)


# ----------------------------------------------------------------------------- references


def _head_outputs(engine, inputs) -> torch.Tensor:
    """(L, H, Dh) o_proj inputs at the last position, captured with our own pre-hooks."""
    layers = engine.adapter.decoder_layers(engine.model)
    heads = engine.model.config.get_text_config().num_attention_heads
    got = {}
    hooks = [
        engine.adapter.o_proj(layer).register_forward_pre_hook(
            lambda m, args, i=i: got.__setitem__(i, args[0][0, -1].detach().clone()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            engine.model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([got[i] for i in range(len(layers))]).reshape(len(layers), heads, -1)


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_direct_references(arch):
    engine = veridical.load(f"tiny-random:{arch}")
    image = _image(1)
    profile = profile_model(engine, [image], PROMPT, progress=False)
    layers = len(engine.adapter.decoder_layers(engine.model))
    heads = engine.model.config.get_text_config().num_attention_heads
    for name in HEAD_SCORES:
        assert head_scores(profile, name).shape == (layers, heads)
    # The profiler ran with eager attention and restored the previous implementation.
    assert engine.model.config.get_text_config()._attn_implementation == "sdpa"

    real = encode(engine.processor, image, PROMPT)
    text = encode(engine.processor, None, PROMPT)
    blank = dict(real, pixel_values=torch.zeros_like(real["pixel_values"]))
    with_image, text_only = _head_outputs(engine, real), _head_outputs(engine, text)
    content_free = _head_outputs(engine, blank)  # SDPA here, eager in the profiler
    vhd_ref = (with_image - text_only).norm(dim=-1)
    assert torch.allclose(head_scores(profile, "vhd"), vhd_ref, atol=1e-5)
    assert torch.allclose(head_scores(profile, "text_norm"), text_only.norm(dim=-1), atol=1e-5)
    assert torch.allclose(head_scores(profile, "image_norm"), with_image.norm(dim=-1), atol=1e-5)
    sens_ref = (with_image - content_free).norm(dim=-1) / with_image.norm(dim=-1)
    assert torch.allclose(head_scores(profile, "visual_sensitivity"), sens_ref, atol=1e-5)

    # Image-attention share against the attentions the model itself returns with eager attention.
    eager = veridical.load(f"tiny-random:{arch}")
    eager.model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        out = eager.model(**real, use_cache=False, output_attentions=True)
    mask = real["input_ids"][0] == eager.adapter.image_token_id(eager.model.config)
    share_ref = torch.stack([a[0, :, -1][:, mask].sum(-1) for a in out.attentions])
    share = head_scores(profile, "image_attention")
    assert torch.allclose(share, share_ref, atol=1e-5)
    assert bool(((share >= 0) & (share <= 1)).all())
    assert 0 < share.mean() < 1


def test_scores_average_over_items_and_noise_counterfactual():
    engine = veridical.load("tiny-random:llava")
    images = [_image(1), _image(2, (60, 30))]
    both = profile_model(engine, images, PROMPT, progress=False)
    one = [profile_model(engine, [im], PROMPT, progress=False) for im in images]
    for name in HEAD_SCORES:
        mean = (head_scores(one[0], name) + head_scores(one[1], name)) / 2
        assert torch.allclose(head_scores(both, name), mean, atol=1e-6)
    noisy = profile_model(engine, images[:1], PROMPT, progress=False, counterfactual="noise")
    again = profile_model(engine, images[:1], PROMPT, progress=False, counterfactual="noise")
    assert noisy["scores"] == again["scores"]  # seeded
    assert noisy["scores"]["vhd"] == one[0]["scores"]["vhd"]
    assert noisy["scores"]["visual_sensitivity"] != one[0]["scores"]["visual_sensitivity"]


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_massive_activation_dimension_is_found(arch):
    engine = veridical.load(f"tiny-random:{arch}")
    images = [_image(3)]
    assert sink_dims(profile_model(engine, images, PROMPT, progress=False)) == []
    tokenizer = engine.tokenizer
    sink_token = "<s>" if arch == "llava" else "<|im_start|>"  # the first prompt token
    dim = 37
    with torch.no_grad():
        engine.model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(sink_token), dim] = 50.0
    profile = profile_model(engine, images, PROMPT, progress=False)
    assert sink_dims(profile) == [dim]
    (detail,) = profile["sinks"]["details"]
    assert detail["dim"] == dim
    assert [t["token"] for t in detail["tokens"]] == [sink_token]
    assert detail["image_token_hits"] == 0 and detail["text_token_hits"] >= len(images)
    assert detail["positions"][0]["position"] == 0
    assert detail["max_phi"] > profile["settings"]["tau_effective"]
    # Examining every layer finds it in each of them (it enters with the embedding).
    every = profile_model(engine, images, PROMPT, progress=False, sink_from_layer=0)
    assert every["sinks"]["details"][0]["layers"] == [0, 1]


# ----------------------------------------------------------------------------- cache and errors


def test_fingerprint_tracks_config_and_weights():
    a, b = veridical.load("tiny-random:llava"), veridical.load("tiny-random:llava")
    assert model_fingerprint(a.model) == model_fingerprint(b.model)
    assert model_fingerprint(a.model) != model_fingerprint(veridical.load("tiny-random:llava@1").model)
    before_partial = model_fingerprint(b.model, full_hash_limit=0)
    with torch.no_grad():
        b.model.lm_head.weight[0, 0] += 1.0  # the last tensor
    assert model_fingerprint(a.model) != model_fingerprint(b.model)
    assert model_fingerprint(b.model, full_hash_limit=0) != before_partial


def test_cache_returns_the_profile_without_recomputing(tmp_path, monkeypatch):
    engine = veridical.load("tiny-random:qwen2-vl")
    images = [_image(5), _image(6)]
    first = load_or_profile(engine, images, tmp_path, progress=False)
    assert len(list(tmp_path.glob("profile-*.json"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("profile_model called despite a cached profile")

    monkeypatch.setattr(heads_profile, "profile_model", boom)
    again = load_or_profile(engine, images, tmp_path, progress=False)
    assert again == first
    # Other settings, other images or other weights miss the cache.
    for kwargs in ({"tau": 10.0}, {"limit": 1}):
        with pytest.raises(AssertionError, match="despite"):
            load_or_profile(engine, images, tmp_path, **kwargs)
    with pytest.raises(AssertionError, match="despite"):
        load_or_profile(veridical.load("tiny-random:qwen2-vl@2"), images, tmp_path)
    # A corrupt cache file is recomputed, not trusted.
    path = next(tmp_path.glob("profile-*.json"))
    path.write_text("{not json")
    with pytest.raises(AssertionError, match="despite"):
        load_or_profile(engine, images, tmp_path)


def test_bad_input_names_the_argument(tmp_path):
    engine = veridical.load("tiny-random:llava")
    with pytest.raises(ValueError, match="counterfactual"):
        profile_model(engine, [_image(0)], PROMPT, counterfactual="grey")
    with pytest.raises(ValueError, match="prompts"):
        profile_model(engine, [_image(0)], ["a", "b"])
    with pytest.raises(ValueError, match="images"):
        profile_model(engine, [], PROMPT)
    with pytest.raises(ValueError, match="text-only"):
        profile_model(veridical.load("tiny-random:llama"), [_image(0)], PROMPT)
    with pytest.raises(ValueError, match="limit"):
        calibration_images([_image(0)], limit=0)
    with pytest.raises(ValueError, match="does not exist"):
        calibration_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        calibration_images(tmp_path)
    with pytest.raises(ValueError, match="schema"):
        (tmp_path / "x.json").write_text(json.dumps({"schema": "other"}))
        load_profile(tmp_path / "x.json")


# ----------------------------------------------------------------------------- the model's profile


def test_load_attaches_the_shipped_profile():
    if not SHIPPED.is_file():
        pytest.skip("the built-in model is not shipped in this checkout")
    engine = veridical.load("builtin:synthcoco-llava")
    assert engine.head_profile == load_profile(SHIPPED)
    # the profile the README shows, and the one the model's weights give (same fingerprint)
    assert engine.head_profile == load_profile(ROOT / "docs" / "heads-synthcoco-llava" /
                                               "profile.json")
    assert engine.head_profile["model"]["fingerprint"] == model_fingerprint(engine.model)
    assert sink_dims(engine.head_profile) == []  # var at its defaults acts on nothing


def test_load_finds_a_cached_profile_by_fingerprint(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VERIDICAL_CACHE", str(tmp_path))
    assert veridical.load("tiny-random:llava").head_profile is None
    engine = veridical.load("tiny-random:llava")
    profile = profile_model(engine, [_image(1)], PROMPT, progress=False)
    path = save_model_profile(profile)
    assert path == model_profile_path(model_fingerprint(engine.model))
    assert path.parent == tmp_path / "heads"
    assert veridical.load("tiny-random:llava").head_profile == profile
    assert veridical.load("tiny-random:llava@1").head_profile is None  # other weights
    # an explicit profile wins; a file that does not fit the model is refused or skipped
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**profile, "calibration": {**profile["calibration"], "items": 7}}))
    assert veridical.load("tiny-random:llava", head_profile=other).head_profile["calibration"][
        "items"] == 7
    assert veridical.load("tiny-random:llava", head_profile=profile).head_profile == profile
    wrong = {**profile, "model": {**profile["model"], "num_layers": 5}}
    with pytest.raises(InputError, match="5 layers x 4 heads"):
        veridical.load("tiny-random:llava", head_profile=wrong)
    with pytest.raises(InputError, match="does not exist"):
        veridical.load("tiny-random:llava", head_profile=tmp_path / "missing.json")
    path.write_text(json.dumps(wrong))
    with caplog.at_level("WARNING"):
        assert veridical.load("tiny-random:llava").head_profile is None
    assert "ignoring the head profile" in caplog.text


def test_ensure_profile_builds_once_and_a_later_load_finds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDICAL_CACHE", str(tmp_path))
    engine = veridical.load("tiny-random:qwen2-vl")
    assert engine.head_profile is None
    images = [_image(20), _image(21)]
    profile = ensure_profile(engine, images, limit=1, progress=False)
    assert engine.head_profile is profile and profile["calibration"]["items"] == 1
    assert veridical.load("tiny-random:qwen2-vl").head_profile == profile

    def boom(*args, **kwargs):
        raise AssertionError("profiled although the engine has a profile")

    monkeypatch.setattr(heads_profile, "profile_model", boom)
    assert ensure_profile(engine, images) is profile  # kept, nothing computed
    again = ensure_profile(veridical.load("tiny-random:qwen2-vl"), images, limit=1)
    assert again == profile  # from the cache
    with pytest.raises(AssertionError, match="profiled"):
        ensure_profile(engine, images, replace=True)  # other calibration data: computed


def test_builtin_calibration_data_is_resolved_by_the_command_line(tmp_path, monkeypatch):
    import veridical.world.generate
    from veridical.world import resolve_data

    folder = tmp_path / "world"
    (folder / "images" / "val").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    for i in range(3):
        _image(i).save(folder / "images" / "val" / f"synthcoco_val_{i}.png")
    monkeypatch.setattr(veridical.world.generate, "builtin_world", lambda split: folder)
    data = resolve_data("builtin:synthcoco", "val")
    images, source = calibration_images(data, limit=2, world_split="val")
    assert [p.name for p in images] == ["synthcoco_val_0.png", "synthcoco_val_1.png"]
    assert source == str(folder / "images" / "val")
    with pytest.raises(ValueError, match="is a name, not a folder"):
        calibration_images("builtin:synthcoco")
    with pytest.raises(InputError, match="unknown built-in data 'builtin:coco'"):
        resolve_data("builtin:coco")


def test_heads_never_import_evals():
    for path in (ROOT / "heads").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", path.read_text(), re.M)
        assert not [m for m in imports if "evals" in m], f"{path.name} imports veridical.evals"
    code = ("import sys, veridical.heads, veridical.heads.cli, veridical.world; "
            "print(sorted(m for m in sys.modules if m.startswith('veridical.evals')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_profile_and_heatmaps(tmp_path, capsys):
    data = tmp_path / "data" / "nested"
    data.mkdir(parents=True)
    for i in range(3):
        _image(10 + i).save(data / f"im{i}.png")
    out = tmp_path / "out"
    argv = ["heads", "profile", "--model", "tiny-random:llava", "--data", str(tmp_path / "data"),
            "--limit", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert heads_main(argv) == 0
    printed = capsys.readouterr().out
    assert "vhd" in printed and "sink dims" in printed and "profile.json" in printed
    profile = load_profile(out / "profile.json")
    assert profile["calibration"]["items"] == 2
    assert profile["calibration"]["images"] == ["im0.png", "im1.png"]
    for name in HEAD_SCORES:
        with Image.open(out / f"{name}.png") as png:
            assert png.format == "PNG"
    cached = list((tmp_path / "cache").glob("profile-*.json"))
    assert len(cached) == 1 and load_profile(cached[0]) == profile
    assert load_profile(model_profile_path(profile["model"]["fingerprint"],
                                           tmp_path / "cache")) == profile

    assert heads_main(argv[:-5] + ["0", "--out", str(out)]) == 2
    assert "limit" in capsys.readouterr().err
    bad = ["heads", "profile", "--model", "tiny-random:llava", "--data", str(tmp_path / "nope"),
           "--out", str(out)]
    assert heads_main(bad) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_can_build_the_profile_at_start_up():
    pytest.importorskip("fastapi")
    from veridical.cli import build_parser
    from veridical.server.settings import settings_from_args

    args = build_parser().parse_args(["serve", "--model", "tiny-random:llava",
                                      "--profile-heads", "builtin:synthcoco"])
    assert settings_from_args(args, env={}).profile_heads == "builtin:synthcoco"
