"""Branch inputs for the contrastive family: VCD noise, RITUAL transforms, ICD disturbance.

Each function builds the *input* of one extra branch; combining the branch logits is the methods'
job. All functions are pure: they never modify their arguments, and every random draw comes from
the ``torch.Generator`` passed in, so a branch is reproducible per request and independent of what
else is in the batch. Call them once per request (with that request's generator), before collation.

VCD (DAMO-NLP-SG/VCD ``vcd_utils/vcd_add_noise.py``)
    Forward diffusion ``q(x_t | x_0)`` applied to the processor's NORMALISED pixel tensor:
    ``betas = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start`` with T = 1000,
    ``beta_start = 1e-5``, ``beta_end = 5e-3``; ``alphas_bar = cumprod(1 - betas)`` (so step t
    includes the factors 0..t); ``x_t = sqrt(alphas_bar[t]) * x + sqrt(1 - alphas_bar[t]) * eps``
    with ``eps ~ N(0, I)`` and t = 500 by default. Differences: the schedule is computed in float64
    (the reference uses float32; ``alphas_bar`` differs by at most 3.3e-7), and the noise is drawn
    in float32 on the generator's device from the given generator (the reference uses the global
    RNG), then the result is cast back to the input dtype (the reference noises the float32
    processor output and casts to half afterwards, which is the same order). Any tensor shape works:
    LLaVA ``(N, 3, H, W)``, LLaVA-NeXT ``(N, P, 3, H, W)``, Qwen-VL's flattened patches ``(n, D)``.

RITUAL (sangminwoo/RITUAL ``eval_bench/*_eval_*.py``: torchvision ``transforms.v2``)
    One of six transforms, drawn uniformly per sample, applied to the PIL image before the processor:
    ``RandomHorizontalFlip(p=1)``, ``RandomVerticalFlip(p=1)``, ``RandomRotation(degrees=180)``
    (angle ~ U[-180, 180], nearest-neighbour, ``expand=False``, black fill, centre of the image),
    ``ColorJitter(brightness=1, contrast=1, saturation=1, hue=0.5)`` (factors ~ U[0, 2] and
    hue ~ U[-0.5, 0.5], applied in a random order, PIL's ``ImageEnhance`` and an 8-bit HSV hue
    shift, as torchvision does for PIL images), ``GaussianBlur(kernel_size=13, sigma=(1.5, 2.0))``
    (reflect padding, result rounded), ``RandomResizedCrop(size=336)`` (scale (0.08, 1), ratio
    (3/4, 4/3), ten tries then a centre crop, bilinear resize). Written here with PIL, numpy and
    torch only; the parameters are drawn from the generator in torchvision's order and with its
    formulas. Differences: (1) the crop is resized to the ORIGINAL image size by default, not to the
    reference's 336x336 (LLaVA-1.5's input size), so every branch keeps the size, and for
    dynamic-resolution models (Qwen-VL, LLaVA-NeXT) the image-token count, of the real image; pass
    ``size=(336, 336)`` to reproduce the reference exactly. (2) The choice of transform comes from
    the generator, not from Python's ``random``. (3) Output is always RGB (the reference transforms
    whatever mode the file has and leaves RGB conversion to the processor; ``load_image`` already
    gives RGB). (4) A hue factor of exactly 0 returns the image unchanged (torchvision still runs
    PIL's lossy 8-bit HSV round trip, moving channels by up to ~6 levels; a random draw is exactly
    0 with probability 0). Every output has the input's size except a crop with explicit ``size``.

ICD (p1k0pan/ICD ``experiments/gen_scripts/icd_llava_pope.py``, ``experiments/llava/conversation.py``)
    The contrastive branch sees the same image and question, but the conversation's SYSTEM message
    is replaced by a "disturbance" role (LLaVA: template ``llava_custom`` whose system text is the
    role; rendered ``"{role} USER: <image>\\n{question} ASSISTANT:"``), while the real branch keeps
    the usual system prompt. The scripts sweep five roles (``ICD_DISTURBANCES``); the default here is
    the "confused objects detector" one (the only one that asks for a vague reading). On Q-Former
    models (InstructBLIP, MiniGPT-4) the role instead replaces the Q-Former instruction, optionally
    followed by the question; that variant needs the Q-Former and is not built here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

__all__ = [
    "DEFAULT_DISTURBANCE",
    "ICD_DISTURBANCES",
    "RITUAL_TRANSFORMS",
    "color_jitter",
    "gaussian_blur",
    "hflip",
    "icd_messages",
    "icd_prompt",
    "resized_crop",
    "ritual_transform",
    "rotate",
    "sample_resized_crop_box",
    "vcd_noise",
    "vcd_noise_schedule",
    "vflip",
]

# ---------------------------------------------------------------------------------------------
# VCD: diffusion noise on the normalised pixel tensor
# ---------------------------------------------------------------------------------------------


def vcd_noise_schedule(
    num_steps: int = 1000, beta_start: float = 1e-5, beta_end: float = 5e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """VCD's sigmoid beta schedule and its cumulative alphas, both float64 of shape ``(num_steps,)``.

    ``betas[i] = sigmoid(-6 + 12 i / (num_steps - 1)) * (beta_end - beta_start) + beta_start`` and
    ``alphas_bar[t] = prod_{i <= t} (1 - betas[i])``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(
            f"num_steps must be an integer >= 2, got {num_steps!r}; the reference uses 1000"
        )
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
            f"beta_start={beta_start!r}, beta_end={beta_end!r}; the reference uses 1e-5 and 5e-3"
        )
    grid = torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)
    betas = torch.sigmoid(grid) * (beta_end - beta_start) + beta_start
    alphas_bar = torch.cumprod(1.0 - betas, dim=0)
    return betas, alphas_bar


def vcd_noise(
    pixel_values: torch.Tensor,
    generator: torch.Generator,
    step: int = 500,
    *,
    num_steps: int = 1000,
    beta_start: float = 1e-5,
    beta_end: float = 5e-3,
) -> torch.Tensor:
    """``sqrt(alphas_bar[step]) * pixel_values + sqrt(1 - alphas_bar[step]) * eps``, a new tensor.

    ``pixel_values`` is the processor's normalised float tensor of any shape; ``eps`` is standard
    normal noise of the same shape drawn from ``generator`` (in float32, on the generator's device,
    then moved), so the same generator state gives the same noise on CPU and GPU. The result has
    the input's dtype and device.
    """
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        what = (
            pixel_values.dtype
            if isinstance(pixel_values, torch.Tensor)
            else type(pixel_values).__name__
        )
        raise ValueError(
            f"pixel_values must be a floating-point tensor (the processor's normalised output), "
            f"got {what}; pass the processor's 'pixel_values'"
        )
    _check_generator(generator)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= num_steps - 1:
        raise ValueError(
            f"step must be an integer in [0, {num_steps - 1}] (num_steps={num_steps}), got {step!r}; "
            "VCD uses 500"
        )
    _, alphas_bar = vcd_noise_schedule(num_steps, beta_start, beta_end)
    keep = math.sqrt(float(alphas_bar[step]))
    spread = math.sqrt(1.0 - float(alphas_bar[step]))
    work = torch.float64 if pixel_values.dtype == torch.float64 else torch.float32
    eps = torch.randn(
        pixel_values.shape, generator=generator, device=generator.device, dtype=torch.float32
    )
    eps = eps.to(device=pixel_values.device, dtype=work)
    noised = pixel_values.to(work) * keep + eps * spread
    return noised.to(pixel_values.dtype)


# ---------------------------------------------------------------------------------------------
# RITUAL: random transforms of the PIL image
# ---------------------------------------------------------------------------------------------

RITUAL_TRANSFORMS: tuple[str, ...] = (
    "hflip",
    "vflip",
    "rotation",
    "color_jitter",
    "gaussian_blur",
    "resized_crop",
)
"""The six transforms, in the reference's order; ``ritual_transform`` picks one uniformly."""

_BLUR_KERNEL = 13
_BLUR_SIGMA = (1.5, 2.0)
_JITTER_FACTOR = (0.0, 2.0)  # brightness = contrast = saturation = 1 -> [max(0, 1 - 1), 1 + 1]
_JITTER_HUE = (-0.5, 0.5)
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def hflip(image: Image.Image) -> Image.Image:
    """Mirror left-right."""
    return _check_image(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def vflip(image: Image.Image) -> Image.Image:
    """Mirror top-bottom."""
    return _check_image(image).transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def rotate(image: Image.Image, angle: float) -> Image.Image:
    """Rotate counter-clockwise by ``angle`` degrees about the centre, same size, black corners.

    Nearest-neighbour and ``expand=False``, as torchvision's ``RandomRotation`` defaults.
    """
    image = _check_image(image)
    if not math.isfinite(angle):
        raise ValueError(f"angle must be a finite number of degrees, got {angle!r}")
    fill = (0,) * len(image.getbands()) if len(image.getbands()) > 1 else 0
    return image.rotate(
        float(angle), resample=Image.Resampling.NEAREST, expand=False, fillcolor=fill
    )


def color_jitter(
    image: Image.Image,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
    order: Sequence[int] = (0, 1, 2, 3),
) -> Image.Image:
    """Apply brightness, contrast, saturation and hue adjustments in ``order``.

    ``order`` is a permutation of ``0..3`` (0 brightness, 1 contrast, 2 saturation, 3 hue), as
    torchvision's ``ColorJitter`` draws with ``randperm(4)``. Factors follow torchvision's PIL path:
    brightness, contrast and saturation blend with black, the mean grey level and the greyscale
    image through ``PIL.ImageEnhance`` (factor 1 = unchanged); ``hue`` in [-0.5, 0.5] rotates
    PIL's 8-bit HSV hue channel by ``trunc(hue * 255)`` modulo 256 (0 = unchanged, see module doc).
    """
    image = _check_image(image)
    for name, value in (
        ("brightness", brightness),
        ("contrast", contrast),
        ("saturation", saturation),
    ):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(
                f"{name} factor must be a finite number >= 0 (1 = unchanged), got {value!r}"
            )
    if not -0.5 <= hue <= 0.5:
        raise ValueError(f"hue must be in [-0.5, 0.5] (0 = unchanged), got {hue!r}")
    order = [int(i) for i in order]
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(
            f"order must be a permutation of 0..3 (0 brightness, 1 contrast, 2 saturation, 3 hue), "
            f"got {order!r}"
        )
    out = image
    for index in order:
        if index == 0:
            out = ImageEnhance.Brightness(out).enhance(brightness)
        elif index == 1:
            out = ImageEnhance.Contrast(out).enhance(contrast)
        elif index == 2:
            out = ImageEnhance.Color(out).enhance(saturation)
        else:
            out = _shift_hue(out, hue)
    return out if out is not image else image.copy()


def _shift_hue(image: Image.Image, hue: float) -> Image.Image:
    if hue == 0.0 or image.mode in ("L", "1", "I", "F"):
        return image
    h, s, v = image.convert("HSV").split()
    # torchvision adds hue * 255 cast to uint8 (truncation toward zero, wrapping negatives).
    shift = int(hue * 255) % 256
    shifted = ((np.asarray(h, dtype=np.int16) + shift) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, mode="L"), s, v)).convert(image.mode)


def gaussian_blur(image: Image.Image, sigma: float, kernel_size: int = _BLUR_KERNEL) -> Image.Image:
    """Blur with a ``kernel_size`` x ``kernel_size`` Gaussian of standard deviation ``sigma``.

    As torchvision: normalised Gaussian weights on integer offsets ``-k//2 .. k//2``, outer product
    for 2-D, reflect padding, float32 convolution, rounded back to uint8. Each side of the image must
    be longer than ``kernel_size // 2`` (reflect padding needs it).
    """
    image = _check_image(image)
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            f"kernel_size must be an odd positive integer, got {kernel_size!r}; RITUAL uses 13"
        )
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(
            f"sigma must be a finite number > 0, got {sigma!r}; RITUAL draws it from [1.5, 2.0]"
        )
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(
            f"image mode {image.mode!r} has no 8-bit channels to blur; convert it first, "
            "e.g. image.convert('RGB')"
        )
    half = kernel_size // 2
    if min(image.size) <= half:
        raise ValueError(
            f"image of size {image.width}x{image.height} is too small for a {kernel_size}x{kernel_size} "
            f"blur; each side must be at least {half + 1} pixels"
        )
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    weights = torch.softmax(-(offsets**2) / (2.0 * float(sigma) ** 2), dim=0)  # normalised Gaussian
    kernel2d = weights[:, None] * weights[None, :]  # (k, k)

    pixels = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, C); a copy
    x = torch.from_numpy(pixels).to(torch.float32)
    x = x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]  # (1, C, H, W)
    channels = x.shape[1]
    x = F.pad(x, (half, half, half, half), mode="reflect")
    y = F.conv2d(x, kernel2d.expand(channels, 1, kernel_size, kernel_size), groups=channels)
    y = y.round().clamp(0, 255).to(torch.uint8)[0]  # (C, H, W)
    out = y[0].numpy() if pixels.ndim == 2 else y.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(out, mode=image.mode)


def sample_resized_crop_box(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = _CROP_SCALE,
    ratio: tuple[float, float] = _CROP_RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` drawn as torchvision's ``RandomResizedCrop``.

    Up to ten tries: area fraction ~ U[scale], aspect ratio w/h = exp(U[log ratio]); the first box
    that fits is placed uniformly at random. If none fits, the centre crop with the largest area
    whose aspect ratio is clamped into ``ratio`` (the whole image when it already fits).
    """
    _check_generator(generator)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    if not 0.0 < scale[0] <= scale[1]:
        raise ValueError(
            f"scale must be (min, max) with 0 < min <= max, got {scale!r}; torchvision uses (0.08, 1.0)"
        )
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(
            f"ratio must be (min, max) with 0 < min <= max, got {ratio!r}; torchvision uses (3/4, 4/3)"
        )
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int] | None = None
) -> Image.Image:
    """Crop ``box = (top, left, height, width)`` and resize it bilinearly to ``size = (height, width)``.

    ``size=None`` resizes back to the image's own size.
    """
    image = _check_image(image)
    top, left, h, w = (int(v) for v in box)
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > image.height or left + w > image.width:
        raise ValueError(
            f"box (top, left, height, width) = {box!r} does not lie inside the "
            f"{image.width}x{image.height} image; draw it with sample_resized_crop_box"
        )
    out_h, out_w = _check_size(size) if size is not None else (image.height, image.width)
    return image.crop((left, top, left + w, top + h)).resize(
        (out_w, out_h), Image.Resampling.BILINEAR
    )


def ritual_transform(
    image: Image.Image, generator: torch.Generator, *, size: int | tuple[int, int] | None = None
) -> tuple[Image.Image, str]:
    """RITUAL's branch image: one of ``RITUAL_TRANSFORMS`` drawn uniformly, applied to ``image``.

    Returns ``(transformed RGB image, transform name)``. The output has the input's size, except a
    ``resized_crop`` when ``size`` is given (an int for a square, or ``(height, width)``); the
    reference's LLaVA-1.5 setting is ``size=336``. The input image is not modified.
    """
    image = _check_image(image)
    _check_generator(generator)
    out_size = None if size is None else _check_size(size)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    name = RITUAL_TRANSFORMS[int(torch.randint(len(RITUAL_TRANSFORMS), (1,), generator=generator))]
    if name == "hflip":
        out = hflip(rgb)
    elif name == "vflip":
        out = vflip(rgb)
    elif name == "rotation":
        out = rotate(rgb, _uniform(generator, -180.0, 180.0))
    elif name == "color_jitter":
        order = torch.randperm(4, generator=generator).tolist()
        b = _uniform(generator, *_JITTER_FACTOR)
        c = _uniform(generator, *_JITTER_FACTOR)
        s = _uniform(generator, *_JITTER_FACTOR)
        h = _uniform(generator, *_JITTER_HUE)
        out = color_jitter(rgb, b, c, s, h, order=order)
    elif name == "gaussian_blur":
        out = gaussian_blur(rgb, _uniform(generator, *_BLUR_SIGMA), _BLUR_KERNEL)
    else:
        box = sample_resized_crop_box(rgb.width, rgb.height, generator)
        out = resized_crop(rgb, box, out_size)
    return out, name


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    # float32 draw, as torchvision's ``torch.empty(1).uniform_(low, high)``.
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _check_image(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a PIL.Image.Image, got {type(image).__name__}; load it with veridical.images.load_image"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is empty (size {image.width}x{image.height})")
    return image


def _check_generator(generator: Any) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            "pass e.g. torch.Generator().manual_seed(seed)"
        )


def _check_size(size: Any) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(
            f"size must be a positive int or a (height, width) pair of them, got {size!r}"
        )
    return pair  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# ICD: disturbed instruction
# ---------------------------------------------------------------------------------------------

ICD_DISTURBANCES: tuple[str, ...] = (
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, "
    "colors and relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
)
"""The five role prompts the ICD scripts sweep, verbatim (grammar included), in their LLaVA order."""

DEFAULT_DISTURBANCE: str = ICD_DISTURBANCES[3]


def icd_messages(
    messages: Sequence[dict[str, Any]], role: str = DEFAULT_DISTURBANCE
) -> list[dict[str, Any]]:
    """The ICD branch's chat: ``messages`` with the system message replaced by ``role``.

    A leading ``system`` message is replaced; without one, a system message is inserted first. The
    other messages are the same objects (not copied, not modified). The system content takes the
    form of the first other message's content: a string, or ``[{"type": "text", "text": role}]``
    when contents are lists of parts (multimodal processors).
    """
    _check_role(role)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of chat messages (dicts with 'role' and 'content'), "
            f"got {type(messages).__name__}; for a plain prompt string use icd_prompt"
        )
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' key, got {m!r}")
    rest = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not rest:
        raise ValueError(
            "messages has no user turn; ICD disturbs the system message of a conversation"
        )
    content: Any = role
    if isinstance(rest[0].get("content"), list):
        content = [{"type": "text", "text": role}]
    return [{"role": "system", "content": content}, *rest]


def icd_prompt(prompt: str, role: str = DEFAULT_DISTURBANCE) -> str:
    """``role + " " + prompt``: the disturbed instruction for a model with no chat template.

    This is how the reference lays the text out when the role takes the system slot of a template
    without role markers (``"{role} USER: ..."``) and how its MiniGPT-4 script prefixes the question.
    Prefer ``icd_messages`` whenever the model has a chat template.
    """
    _check_role(role)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return f"{role} {prompt}"


def _check_role(role: Any) -> None:
    if not isinstance(role, str) or not role.strip():
        raise ValueError(
            f"role must be a non-empty disturbance instruction, got {role!r}; "
            "see branches.ICD_DISTURBANCES (default DEFAULT_DISTURBANCE)"
        )
