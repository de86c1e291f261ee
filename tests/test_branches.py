"""Branch construction: VCD noise, RITUAL transforms, ICD disturbance (decoding/branches.py)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from veridical.decoding import branches as br


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


@pytest.fixture
def crafted() -> Image.Image:
    """A 12x9 (W x H) RGB image whose every pixel is distinct."""
    h, w = 9, 12
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 20, yy * 25, (xx + yy * w) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture
def noise_image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# VCD
# ---------------------------------------------------------------------------------------------


def _sigmoid_beta(i: int, n: int = 1000, lo: float = 1e-5, hi: float = 5e-3) -> float:
    z = -6.0 + 12.0 * i / (n - 1)
    return 1.0 / (1.0 + math.exp(-z)) * (hi - lo) + lo


def test_schedule_matches_closed_form():
    betas, alphas_bar = br.vcd_noise_schedule()
    assert betas.shape == alphas_bar.shape == (1000,)
    assert betas[0].item() == pytest.approx(_sigmoid_beta(0), rel=1e-12)
    assert betas[999].item() == pytest.approx(_sigmoid_beta(999), rel=1e-12)
    prod = 1.0
    for i in range(501):  # step t includes the factors 0..t
        prod *= 1.0 - _sigmoid_beta(i)
    assert alphas_bar[500].item() == pytest.approx(prod, rel=1e-12)
    assert math.sqrt(alphas_bar[500].item()) == pytest.approx(0.8630171064602814, abs=1e-12)
    assert math.sqrt(1 - alphas_bar[500].item()) == pytest.approx(0.5051746964733322, abs=1e-12)


def test_schedule_close_to_reference_float32():
    # The reference builds the schedule in float32; ours is float64 and differs by < 3.3e-7.
    betas32 = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    ref = torch.cumprod(1 - betas32, dim=0).double()
    _, ours = br.vcd_noise_schedule()
    assert (ours - ref).abs().max().item() < 5e-7


def test_vcd_noise_is_the_reference_formula():
    x = torch.randn(2, 3, 8, 8, generator=gen(7))
    out = br.vcd_noise(x, gen(3), step=500)
    eps = torch.randn(x.shape, generator=gen(3))
    expected = x * 0.8630171064602814 + eps * 0.5051746964733322
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_vcd_noise_statistics():
    zeros = torch.zeros(1, 3, 64, 64)
    out = br.vcd_noise(zeros, gen(0)) / 0.5051746964733322  # pure noise, scaled back to N(0, 1)
    assert abs(out.mean().item()) < 0.03
    assert abs(out.std().item() - 1.0) < 0.03
    ones = br.vcd_noise(torch.ones(1, 3, 64, 64), gen(0))
    assert ones.mean().item() == pytest.approx(0.8630171064602814, abs=0.02)
    late = br.vcd_noise(torch.ones(1, 3, 64, 64), gen(0), step=999)  # mostly noise
    assert ones.std().item() < late.std().item()


def test_vcd_noise_deterministic_per_generator_and_input_untouched():
    x = torch.randn(1, 3, 16, 16, generator=gen(1))
    before = x.clone()
    a = br.vcd_noise(x, gen(5))
    b = br.vcd_noise(x, gen(5))
    c = br.vcd_noise(x, gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, before)
    assert a.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 8, 8), (1, 5, 3, 8, 8), (64, 1176)],
    ids=["llava", "llava-next", "qwen-patches"],
)
def test_vcd_noise_any_pixel_layout(shape):
    x = torch.randn(shape, generator=gen(2))
    out = br.vcd_noise(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    half = br.vcd_noise(x.to(torch.bfloat16), gen(0))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("step", [-1, 1000, 2.5, True, "500"])
def test_vcd_noise_rejects_bad_step(step):
    with pytest.raises(ValueError, match="step must be an integer in \\[0, 999\\]"):
        br.vcd_noise(torch.zeros(1, 3, 4, 4), gen(), step=step)


def test_vcd_noise_rejects_bad_inputs():
    with pytest.raises(ValueError, match="floating-point tensor"):
        br.vcd_noise(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), gen())
    with pytest.raises(TypeError, match="torch.Generator"):
        br.vcd_noise(torch.zeros(1, 3, 4, 4), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta_start"):
        br.vcd_noise_schedule(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="num_steps"):
        br.vcd_noise_schedule(num_steps=1)


# ---------------------------------------------------------------------------------------------
# RITUAL: each transform's defining property
# ---------------------------------------------------------------------------------------------


def test_flips(crafted):
    a = pixels(crafted)
    assert np.array_equal(pixels(br.hflip(crafted)), a[:, ::-1])
    assert np.array_equal(pixels(br.vflip(crafted)), a[::-1])
    assert np.array_equal(pixels(br.hflip(br.hflip(crafted))), a)
    assert np.array_equal(pixels(br.vflip(br.vflip(crafted))), a)


def test_rotation(crafted):
    a = pixels(crafted)
    assert np.array_equal(pixels(br.rotate(crafted, 0.0)), a)
    assert np.array_equal(pixels(br.rotate(crafted, 180.0)), pixels(br.hflip(br.vflip(crafted))))
    square = crafted.crop((0, 0, 9, 9))
    # positive angles turn counter-clockwise (torchvision's and PIL's convention)
    assert np.array_equal(pixels(br.rotate(square, 90.0)), np.rot90(pixels(square)))
    white = Image.new("RGB", (21, 15), (255, 255, 255))
    turned = br.rotate(white, 45.0)
    assert turned.size == white.size and turned.mode == "RGB"  # expand=False
    assert turned.getpixel((0, 0)) == (0, 0, 0)  # black fill
    assert turned.getpixel((10, 7)) == (255, 255, 255)


def test_color_jitter_neutral_factors_are_identity(crafted):
    a = pixels(crafted)
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)]:
        out = br.color_jitter(crafted, 1.0, 1.0, 1.0, 0.0, order=order)
        assert np.array_equal(pixels(out), a)
        assert out is not crafted


def test_color_jitter_factors(crafted):
    assert pixels(br.color_jitter(crafted, brightness=0.0)).max() == 0
    grey = pixels(br.color_jitter(crafted, saturation=0.0))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    flat = pixels(br.color_jitter(crafted, contrast=0.0))
    mean_l = int(np.asarray(crafted.convert("L"), dtype=np.float64).mean() + 0.5)
    assert np.all(flat == mean_l)
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert br.color_jitter(red, hue=1 / 3).getpixel((0, 0)) == (0, 255, 0)  # 85/255 of a turn
    cyanish = br.color_jitter(red, hue=0.5).getpixel((0, 0))
    assert cyanish[0] == 0 and min(cyanish[1:]) >= 240


def test_gaussian_blur(noise_image):
    a = pixels(noise_image).astype(np.float64)
    out = pixels(br.gaussian_blur(noise_image, 1.75)).astype(np.float64)
    assert out.shape == a.shape
    assert abs(out.mean() - a.mean()) < 1.0
    assert out.var() < a.var() / 10
    flat = Image.new("RGB", (20, 20), (17, 99, 201))
    assert np.array_equal(pixels(br.gaussian_blur(flat, 2.0)), pixels(flat))
    impulse = Image.new("RGB", (31, 31))
    impulse.putpixel((15, 15), (255, 255, 255))
    spread = pixels(br.gaussian_blur(impulse, 1.75))
    centre_weight = 1.0 / sum(math.exp(-(t * t) / (2 * 1.75**2)) for t in range(-6, 7))
    assert spread[15, 15, 0] == round(255 * centre_weight**2)  # normalised 13-tap kernel
    assert np.array_equal(spread, spread[::-1, ::-1])
    with pytest.raises(ValueError, match="too small"):
        br.gaussian_blur(Image.new("RGB", (6, 30)), 1.5)
    with pytest.raises(ValueError, match="no 8-bit channels"):
        br.gaussian_blur(noise_image.convert("F"), 1.5)
    with pytest.raises(ValueError, match="odd positive"):
        br.gaussian_blur(noise_image, 1.5, kernel_size=12)


def test_resized_crop_box_sampling():
    for seed in range(50):
        top, left, h, w = br.sample_resized_crop_box(48, 40, gen(seed))
        assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= 40 and left + w <= 48
        assert 0.08 * 48 * 40 * 0.8 <= h * w <= 48 * 40  # rounding allowance at the low end
    # scale and ratio pinned to 1: the whole (square) image
    assert br.sample_resized_crop_box(10, 10, gen(), scale=(1, 1), ratio=(1, 1)) == (0, 0, 10, 10)
    # ten failed tries -> torchvision's centre-crop fallback, aspect clamped into the ratio range
    assert br.sample_resized_crop_box(20, 10, gen(), scale=(1, 1), ratio=(1, 1)) == (0, 5, 10, 10)
    assert br.sample_resized_crop_box(100, 1, gen()) == (0, 49, 1, 1)


def test_resized_crop_sizes(crafted):
    same = br.resized_crop(crafted, (1, 2, 5, 6))
    assert same.size == crafted.size
    assert br.resized_crop(crafted, (1, 2, 5, 6), (336, 336)).size == (336, 336)
    whole = br.resized_crop(crafted, (0, 0, crafted.height, crafted.width))
    assert np.array_equal(pixels(whole), pixels(crafted))
    with pytest.raises(ValueError, match="does not lie inside"):
        br.resized_crop(crafted, (5, 0, 5, 12))


# ---------------------------------------------------------------------------------------------
# RITUAL: the per-sample draw
# ---------------------------------------------------------------------------------------------


def test_ritual_transform_deterministic_per_seed(noise_image):
    for seed in range(12):
        a, name_a = br.ritual_transform(noise_image, gen(seed))
        b, name_b = br.ritual_transform(noise_image, gen(seed))
        assert name_a == name_b and a.tobytes() == b.tobytes()


def test_ritual_transform_draws_all_six_uniformly_and_keeps_size():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8))
    before = image.tobytes()
    counts: Counter[str] = Counter()
    for seed in range(360):
        out, name = br.ritual_transform(image, gen(seed))
        counts[name] += 1
        assert out.mode == "RGB" and out.size == image.size, name
    assert set(counts) == set(br.RITUAL_TRANSFORMS)
    assert all(35 <= n <= 85 for n in counts.values()), counts  # 60 expected each
    assert image.tobytes() == before


def test_ritual_transform_modes_and_reference_crop_size(noise_image):
    grey = noise_image.convert("L")
    rgba = noise_image.convert("RGBA")
    for seed in range(12):
        for source in (grey, rgba):
            out, _ = br.ritual_transform(source, gen(seed))
            assert out.mode == "RGB" and out.size == source.size
        out, name = br.ritual_transform(noise_image, gen(seed), size=336)
        assert out.size == ((336, 336) if name == "resized_crop" else noise_image.size)


def test_ritual_transform_rejects_bad_arguments(noise_image):
    with pytest.raises(TypeError, match="PIL.Image"):
        br.ritual_transform(np.zeros((4, 4, 3)), gen())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.Generator"):
        br.ritual_transform(noise_image, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size must be"):
        br.ritual_transform(noise_image, gen(), size=(0, 3))
    with pytest.raises(ValueError, match="hue must be in"):
        br.color_jitter(noise_image, hue=0.7)
    with pytest.raises(ValueError, match="permutation"):
        br.color_jitter(noise_image, order=(0, 0, 1, 2))


# ---------------------------------------------------------------------------------------------
# ICD
# ---------------------------------------------------------------------------------------------


def test_icd_default_disturbance_is_the_reference_string():
    assert br.DEFAULT_DISTURBANCE == (
        "You are a confused objects detector to provide a fuzzy overview or impression of the image."
    )
    assert len(br.ICD_DISTURBANCES) == 5


def test_icd_messages_replace_or_insert_the_system_message():
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "is there a dog"}],
    }
    msgs = [user]
    out = br.icd_messages(msgs)
    assert out == [
        {"role": "system", "content": [{"type": "text", "text": br.DEFAULT_DISTURBANCE}]},
        user,
    ]
    assert msgs == [user]  # input list untouched
    with_system = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi"},
    ]
    out = br.icd_messages(with_system, role="Be vague.")
    assert out == [{"role": "system", "content": "Be vague."}, {"role": "user", "content": "hi"}]
    assert with_system[0]["content"] == "You are helpful."


def test_icd_prompt_and_errors():
    assert br.icd_prompt("is there a dog?", role="Be vague.") == "Be vague. is there a dog?"
    with pytest.raises(ValueError, match="role must be a non-empty"):
        br.icd_prompt("q", role="  ")
    with pytest.raises(TypeError, match="use icd_prompt"):
        br.icd_messages("is there a dog?")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no user turn"):
        br.icd_messages([{"role": "system", "content": "x"}])
