"""SynthCOCO pixels: object glyphs, scene backgrounds and the renderer.

Contract:
- Every category of the world is drawn as ONE glyph: a silhouette (defined here, in normalised
  box coordinates) filled with ONE colour from :data:`PALETTE`. No silhouette is a flip or a
  90-degree rotation of another (tests/test_synthcoco.py checks it), so an object can only be
  named from its own shape and colour; partners share nothing in look.
- :func:`glyph_coverage` is pure and cached: ``(name, w, h) -> float32 (h, w)`` anti-aliased
  coverage in [0, 1] (8x8 supersampling). A pixel belongs to an object when coverage >= 0.5.
- :func:`render_layout` is pure: the same layout gives the same uint8 ``(H, W, 3)`` array.
  Everything random (positions, colours, clutter, the noise seed) was drawn before, in the layout.
- :func:`background` gives the scene background alone (two flat colour bands), so tests can check
  that pixels away from objects are background.

Only numpy and PIL; no torch, no torchvision.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "PALETTE",
    "GLYPHS",
    "glyph_dims",
    "glyph_coverage",
    "background",
    "render_layout",
]

# Named colours an object can have. The names are words no COCO synonym uses ("orange" is a COCO
# category, so it is not a colour here); the values are saturated, or very light / very dark, so
# that every one stands off every (muted) scene background by at least ~85 RGB units.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 80, 220),
    "yellow": (245, 210, 30),
    "purple": (135, 50, 190),
    "pink": (250, 125, 190),
    "white": (248, 248, 244),
    "black": (22, 22, 28),
}

# Glyph = (aspect (w, h) with max 1, ops). Ops draw in normalised box coordinates (x right, y
# down, [0, 1]); value 1 paints, 0 erases (holes show what lies behind the object).
#   ("rect", x0, y0, x1, y1, v) ("ellipse", x0, y0, x1, y1, v)
#   ("chord", x0, y0, x1, y1, start_deg, end_deg, v)   PIL angles: clockwise from 3 o'clock
#   ("poly", ((x, y), ...), v)  ("line", ((x, y), ...), width_as_fraction_of_short_side, v)
Op = tuple[Any, ...]


def _octagon(x0: float, y0: float, x1: float, y1: float) -> tuple[tuple[float, float], ...]:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    k = 1 / math.cos(math.pi / 8)  # circumradius so that the flat sides touch the box
    return tuple(
        (cx + rx * k * math.cos(math.pi / 8 + i * math.pi / 4),
         cy + ry * k * math.sin(math.pi / 8 + i * math.pi / 4))
        for i in range(8)
    )


def _lens(a: float, b: float, angle_deg: float, n: int = 40) -> tuple[tuple[float, float], ...]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    x, y = a * np.cos(t), b * np.sin(t)
    return tuple((0.5 + c * xi - s * yi, 0.5 + s * xi + c * yi) for xi, yi in zip(x, y))


GLYPHS: dict[str, tuple[tuple[float, float], tuple[Op, ...]]] = {
    # kitchen
    "fork": ((0.55, 1.0), (
        ("rect", 0.0, 0.0, 0.25, 0.45, 1), ("rect", 0.375, 0.0, 0.625, 0.45, 1),
        ("rect", 0.75, 0.0, 1.0, 0.45, 1), ("rect", 0.0, 0.32, 1.0, 0.5, 1),
        ("rect", 0.34, 0.45, 0.66, 1.0, 1),
    )),
    "knife": ((1.0, 0.4), (
        ("rect", 0.0, 0.36, 0.38, 0.86, 1),
        ("poly", ((0.34, 0.0), (1.0, 0.0), (0.8, 0.7), (0.34, 1.0)), 1),
    )),
    "cup": ((1.0, 0.85), (
        ("ellipse", 0.48, 0.16, 1.0, 0.74, 1), ("ellipse", 0.64, 0.33, 0.86, 0.57, 0),
        ("rect", 0.0, 0.0, 0.7, 1.0, 1),
    )),
    "bowl": ((1.0, 0.58), (
        ("chord", 0.0, -0.8, 1.0, 0.84, 0, 180, 1), ("rect", 0.0, 0.0, 1.0, 0.14, 1),
        ("rect", 0.3, 0.78, 0.7, 1.0, 1),
    )),
    "bottle": ((0.44, 1.0), (
        ("rect", 0.32, 0.0, 0.68, 0.3, 1),
        ("poly", ((0.32, 0.28), (0.68, 0.28), (1.0, 0.46), (0.0, 0.46)), 1),
        ("rect", 0.0, 0.45, 1.0, 1.0, 1),
    )),
    "wine glass": ((0.62, 1.0), (
        ("chord", 0.0, -0.5, 1.0, 0.52, 0, 180, 1), ("rect", 0.4, 0.45, 0.6, 0.9, 1),
        ("rect", 0.06, 0.86, 0.94, 1.0, 1),
    )),
    # street
    "traffic light": ((0.46, 1.0), (
        ("rect", 0.0, 0.0, 1.0, 0.74, 1),
        ("ellipse", 0.27, 0.05, 0.73, 0.24, 0), ("ellipse", 0.27, 0.28, 0.73, 0.47, 0),
        ("ellipse", 0.27, 0.51, 0.73, 0.7, 0), ("rect", 0.36, 0.72, 0.64, 1.0, 1),
    )),
    "stop sign": ((0.8, 1.0), (
        ("poly", _octagon(0.0, 0.0, 1.0, 0.8), 1), ("rect", 0.14, 0.32, 0.86, 0.48, 0),
        ("rect", 0.4, 0.78, 0.6, 1.0, 1),
    )),
    "car": ((1.0, 0.6), (
        ("rect", 0.0, 0.38, 1.0, 0.8, 1),
        ("poly", ((0.16, 0.4), (0.3, 0.0), (0.68, 0.0), (0.84, 0.4)), 1),
        ("ellipse", 0.06, 0.56, 0.36, 1.0, 1), ("ellipse", 0.64, 0.56, 0.94, 1.0, 1),
    )),
    "truck": ((1.0, 0.62), (
        ("rect", 0.0, 0.0, 0.63, 0.8, 1),
        ("poly", ((0.67, 0.24), (0.86, 0.24), (1.0, 0.5), (1.0, 0.8), (0.67, 0.8)), 1),
        ("rect", 0.74, 0.33, 0.87, 0.5, 0),
        ("ellipse", 0.05, 0.64, 0.25, 1.0, 1), ("ellipse", 0.33, 0.64, 0.53, 1.0, 1),
        ("ellipse", 0.74, 0.64, 0.94, 1.0, 1),
    )),
    "bicycle": ((1.0, 0.64), (
        ("ellipse", 0.0, 0.4, 0.38, 1.0, 1), ("ellipse", 0.11, 0.57, 0.27, 0.83, 0),
        ("ellipse", 0.62, 0.4, 1.0, 1.0, 1), ("ellipse", 0.73, 0.57, 0.89, 0.83, 0),
        ("line", ((0.19, 0.7), (0.42, 0.3), (0.76, 0.3), (0.81, 0.7)), 0.2, 1),
        ("line", ((0.42, 0.3), (0.5, 0.7), (0.19, 0.7)), 0.2, 1),
        ("line", ((0.4, 0.08), (0.44, 0.32)), 0.2, 1), ("rect", 0.3, 0.0, 0.52, 0.14, 1),
        ("line", ((0.76, 0.3), (0.7, 0.04)), 0.2, 1),
    )),
    "fire hydrant": ((0.7, 1.0), (
        ("ellipse", 0.18, 0.0, 0.82, 0.32, 1), ("rect", 0.2, 0.16, 0.8, 0.9, 1),
        ("rect", 0.0, 0.36, 1.0, 0.56, 1), ("rect", 0.06, 0.88, 0.94, 1.0, 1),
    )),
    # beach
    "umbrella": ((1.0, 0.95), (
        ("chord", 0.0, 0.0, 1.0, 0.9, 180, 360, 1), ("rect", 0.45, 0.42, 0.56, 0.98, 1),
        ("rect", 0.28, 0.87, 0.56, 1.0, 1), ("rect", 0.26, 0.76, 0.37, 1.0, 1),
    )),
    "surfboard": ((1.0, 1.0), (
        ("poly", _lens(0.66, 0.17, -45.0), 1),
    )),
    "kite": ((0.72, 1.0), (
        ("poly", ((0.5, 0.0), (1.0, 0.3), (0.5, 0.74), (0.0, 0.3)), 1),
        ("line", ((0.5, 0.72), (0.66, 0.84), (0.4, 0.92), (0.56, 1.0)), 0.16, 1),
    )),
    "frisbee": ((1.0, 0.42), (
        ("ellipse", 0.0, 0.0, 1.0, 1.0, 1),
    )),
    "boat": ((1.0, 0.9), (
        ("poly", ((0.0, 0.62), (1.0, 0.62), (0.8, 1.0), (0.2, 1.0)), 1),
        ("rect", 0.45, 0.0, 0.55, 0.64, 1),
        ("poly", ((0.58, 0.04), (0.58, 0.56), (0.95, 0.56)), 1),
    )),
    "bird": ((1.0, 0.5), (
        ("line", ((0.02, 0.4), (0.24, 0.08), (0.5, 0.6), (0.76, 0.08), (0.98, 0.4)), 0.36, 1),
    )),
    # living room
    "couch": ((1.0, 0.62), (
        ("rect", 0.14, 0.0, 0.86, 0.6, 1), ("rect", 0.0, 0.32, 0.2, 0.84, 1),
        ("rect", 0.8, 0.32, 1.0, 0.84, 1), ("rect", 0.0, 0.52, 1.0, 0.84, 1),
        ("rect", 0.03, 0.84, 0.15, 1.0, 1), ("rect", 0.85, 0.84, 0.97, 1.0, 1),
    )),
    "tv": ((1.0, 0.82), (
        ("rect", 0.0, 0.0, 1.0, 0.8, 1), ("rect", 0.14, 0.15, 0.86, 0.65, 0),
        ("rect", 0.42, 0.78, 0.58, 0.92, 1), ("rect", 0.24, 0.9, 0.76, 1.0, 1),
    )),
    "clock": ((1.0, 1.0), (
        ("ellipse", 0.0, 0.0, 1.0, 1.0, 1), ("ellipse", 0.2, 0.2, 0.8, 0.8, 0),
        ("rect", 0.44, 0.22, 0.56, 0.56, 1), ("rect", 0.44, 0.44, 0.78, 0.56, 1),
    )),
    "potted plant": ((0.8, 1.0), (
        ("poly", ((0.16, 0.6), (0.84, 0.6), (0.7, 1.0), (0.3, 1.0)), 1),
        ("ellipse", 0.25, 0.0, 0.75, 0.48, 1), ("ellipse", 0.0, 0.16, 0.5, 0.6, 1),
        ("ellipse", 0.5, 0.16, 1.0, 0.6, 1), ("rect", 0.44, 0.45, 0.56, 0.62, 1),
    )),
    "chair": ((0.7, 1.0), (
        ("rect", 0.0, 0.0, 0.26, 1.0, 1), ("rect", 0.0, 0.48, 1.0, 0.66, 1),
        ("rect", 0.76, 0.48, 1.0, 1.0, 1),
    )),
    "teddy bear": ((1.0, 1.0), (
        ("ellipse", 0.0, 0.0, 0.42, 0.42, 1), ("ellipse", 0.58, 0.0, 1.0, 0.42, 1),
        ("ellipse", 0.1, 0.14, 0.9, 0.96, 1),
    )),
}

_SUPERSAMPLE = 8


def glyph_dims(name: str, size: int) -> tuple[int, int]:
    """Pixel (w, h) of glyph ``name`` whose longer side is ``size``; the shorter side >= 3 px."""
    if name not in GLYPHS:
        raise ValueError(f"name={name!r} has no glyph; known: {sorted(GLYPHS)}")
    if size < 4:
        raise ValueError(f"size={size} is too small to draw a glyph; use size >= 4")
    (aw, ah), _ = GLYPHS[name]
    return max(3, round(size * aw)), max(3, round(size * ah))


@functools.lru_cache(maxsize=4096)
def _coverage_cached(name: str, w: int, h: int) -> np.ndarray:
    _, ops = GLYPHS[name]
    s = _SUPERSAMPLE
    cw, ch = w * s, h * s
    canvas = Image.new("L", (cw, ch), 0)
    draw = ImageDraw.Draw(canvas)

    def px(x: float, y: float) -> tuple[float, float]:
        return x * cw, y * ch

    for op in ops:
        kind, v = op[0], 255 * op[-1]
        if kind in ("rect", "ellipse", "chord"):
            x0, y0 = px(op[1], op[2])
            x1, y1 = px(op[3], op[4])
            box = [x0, y0, x1 - 1, y1 - 1]
            if kind == "rect":
                draw.rectangle(box, fill=v)
            elif kind == "ellipse":
                draw.ellipse(box, fill=v)
            else:
                draw.chord(box, op[5], op[6], fill=v)
        elif kind == "poly":
            draw.polygon([px(x, y) for x, y in op[1]], fill=v)
        elif kind == "line":
            width = max(1, round(op[2] * min(cw, ch)))
            pts = [px(x, y) for x, y in op[1]]
            draw.line(pts, fill=v, width=width, joint="curve")
            r = width / 2  # round caps so that thick strokes end cleanly
            for x, y in (pts[0], pts[-1]):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=v)
        else:  # pragma: no cover - the table above is fixed
            raise ValueError(f"glyph {name!r}: unknown op {kind!r}")
    cov = np.asarray(canvas, dtype=np.float32).reshape(h, s, w, s).mean(axis=(1, 3)) / 255.0
    cov.setflags(write=False)
    return cov


def glyph_coverage(name: str, w: int, h: int) -> np.ndarray:
    """Anti-aliased coverage (float32, (h, w), read-only) of glyph ``name`` drawn in a w x h box."""
    if name not in GLYPHS:
        raise ValueError(f"name={name!r} has no glyph; known: {sorted(GLYPHS)}")
    if w < 1 or h < 1:
        raise ValueError(f"glyph box {w}x{h} is empty; use w >= 1 and h >= 1")
    return _coverage_cached(name, w, h)


def background(bands: tuple[tuple[int, int, int], tuple[int, int, int], float], size: int) -> np.ndarray:
    """Scene background: ``top`` colour above ``horizon * size`` rows, ``bottom`` below; uint8."""
    top, bottom, horizon = bands
    img = np.empty((size, size, 3), dtype=np.uint8)
    cut = round(horizon * size)
    img[:cut] = top
    img[cut:] = bottom
    return img


def render_layout(layout: Any, bands: tuple[tuple[int, int, int], tuple[int, int, int], float]) -> np.ndarray:
    """Pixels of a layout (see ``veridical.world.world.Layout``) over a scene's background bands.

    Order: background, clutter strokes (1 px lines, under the objects), objects in draw order
    (alpha-blended by coverage), then Gaussian noise of ``layout.noise_sigma`` drawn from
    ``layout.noise_seed``; rounded and clipped to uint8.
    """
    size = layout.size
    base = Image.fromarray(background(bands, size))
    if layout.clutter:
        draw = ImageDraw.Draw(base)
        for x0, y0, x1, y1, rgb in layout.clutter:
            draw.line([(x0, y0), (x1, y1)], fill=tuple(rgb), width=1)
    img = np.asarray(base, dtype=np.float32).copy()
    for obj in layout.objects:
        a = glyph_coverage(obj.category, obj.w, obj.h)[..., None]  # (h, w, 1)
        patch = img[obj.y:obj.y + obj.h, obj.x:obj.x + obj.w]
        patch *= 1.0 - a
        patch += a * np.asarray(obj.rgb, dtype=np.float32)
    if layout.noise_sigma > 0:
        noise_rng = np.random.default_rng(layout.noise_seed)
        img += noise_rng.normal(0.0, layout.noise_sigma, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
