"""SynthCOCO world: categories, scenes, co-occurrence, and the sampling of one image's layout.

Contract:
- :class:`WorldConfig` (frozen) holds every parameter of the world with a documented default; the
  defaults are the frozen world the built-in model is trained on. It validates itself: a bad value
  raises ``ValueError`` naming the field, the value and the fix.
- :func:`build_world` is pure: ``config -> World``. Categories, their glyphs and typical colours,
  and which scene each category belongs to are fixed for every world. ``config.world_seed`` only
  re-draws the co-occurrence PARTNERS within each scene: world seed 0 is the curated pairing
  (fork-knife, cup-bowl, traffic light-stop sign, car-truck, umbrella-surfboard, couch-tv, ...);
  any other world seed is a random pairing in every scene sharing no pair with the curated one.
- :func:`sample_layout` is pure given its ``rng``: it draws the scene, the categories present
  (anchors, partners, an out-of-scene object), counts, colours, sizes, positions (with the
  occlusion rule), clutter strokes and a noise seed, and computes each object's visible mask,
  COCO box and area. Rendering pixels is :func:`veridical.world.render.render_layout`.

Generative process of one image (the knobs are WorldConfig fields):
1. scene uniform over the 4 scenes;
2. ``k`` anchor pairs of the scene (``anchor_weights`` gives P(k=1), P(k=2), ...), one member of
   each pair chosen at random as the anchor; its partner joins with ``partner_prob``;
3. one category from another scene joins with ``out_of_scene_prob``;
4. while fewer than ``min_categories`` categories: a same-scene category of an unused pair joins;
5. each category gets 1, 2, 3, ... instances (``count_weights``), trimmed to ``max_instances``;
6. each instance: colour = its category's typical colour with ``typical_color_prob``, else another
   palette colour uniformly, with +-``color_jitter`` RGB jitter; longest side uniform in
   [``size_min``, ``size_max``]; placed at a random position with a 1-px gap to every other object,
   except that with ``occlusion_prob`` it is placed over an object of another category, covering at
   most ``max_occlusion`` of that object's pixels (instances of one category never touch, so that
   counts stay well defined); an instance that cannot be placed is dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .render import PALETTE, glyph_coverage, glyph_dims

__all__ = [
    "WorldConfig",
    "Category",
    "Scene",
    "World",
    "PlacedObject",
    "Layout",
    "COCO_CATEGORIES",
    "SCENES",
    "build_world",
    "sample_layout",
    "image_rng",
]

# The categories of the world: real COCO 2014 ids, names and supercategories.
COCO_CATEGORIES: dict[str, tuple[int, str]] = {
    "bicycle": (2, "vehicle"),
    "car": (3, "vehicle"),
    "truck": (8, "vehicle"),
    "boat": (9, "vehicle"),
    "traffic light": (10, "outdoor"),
    "fire hydrant": (11, "outdoor"),
    "stop sign": (13, "outdoor"),
    "bird": (16, "animal"),
    "umbrella": (28, "accessory"),
    "frisbee": (34, "sports"),
    "kite": (38, "sports"),
    "surfboard": (42, "sports"),
    "bottle": (44, "kitchen"),
    "wine glass": (46, "kitchen"),
    "cup": (47, "kitchen"),
    "fork": (48, "kitchen"),
    "knife": (49, "kitchen"),
    "bowl": (51, "kitchen"),
    "chair": (62, "furniture"),
    "couch": (63, "furniture"),
    "potted plant": (64, "furniture"),
    "tv": (72, "electronic"),
    "clock": (85, "indoor"),
    "teddy bear": (88, "indoor"),
}

# scene -> (background top colour, bottom colour, horizon as a fraction of the height),
#          curated pairs, each (category, typical colour) x 2.
# Within a scene all six typical colours differ and all six silhouettes differ, so ANY pairing a
# world seed draws pairs objects that share no look.
SCENES: dict[str, tuple[tuple[tuple[int, int, int], tuple[int, int, int], float],
                        tuple[tuple[tuple[str, str], tuple[str, str]], ...]]] = {
    "kitchen": (
        ((196, 182, 132), (150, 116, 92), 0.55),
        ((("fork", "purple"), ("knife", "white")),
         (("cup", "red"), ("bowl", "blue")),
         (("bottle", "green"), ("wine glass", "pink"))),
    ),
    "street": (
        ((170, 170, 162), (108, 110, 118), 0.35),
        ((("traffic light", "black"), ("stop sign", "red")),
         (("car", "blue"), ("truck", "yellow")),
         (("bicycle", "green"), ("fire hydrant", "white"))),
    ),
    "beach": (
        ((116, 168, 198), (220, 200, 148), 0.4),
        ((("umbrella", "red"), ("surfboard", "yellow")),
         (("kite", "purple"), ("frisbee", "green")),
         (("boat", "white"), ("bird", "black"))),
    ),
    "living room": (
        ((150, 166, 138), (124, 98, 82), 0.6),
        ((("couch", "purple"), ("tv", "black")),
         (("clock", "white"), ("potted plant", "green")),
         (("chair", "red"), ("teddy bear", "yellow"))),
    ),
}

_WORLD_KEY = 0x5C0C0  # keeps world-seed streams apart from image streams


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class WorldConfig:
    """All parameters of a SynthCOCO world. Defaults = the frozen world of the built-in model."""

    world_seed: int = field(default=0, metadata=_help(
        "co-occurrence draw: 0 = curated partners (fork-knife, ...); any other value re-draws the "
        "partners within each scene (no curated pair kept); images are drawn by --seed"))
    image_size: int = field(default=64, metadata=_help("image width = height, pixels"))
    size_min: int = field(default=8, metadata=_help("smallest object, longest side in pixels"))
    size_max: int = field(default=14, metadata=_help("largest object, longest side in pixels"))
    anchor_weights: tuple[float, ...] = field(default=(0.35, 0.65), metadata=_help(
        "P(1 anchor pair), P(2 anchor pairs), ... drawn from the scene's pairs"))
    partner_prob: float = field(default=0.85, metadata=_help(
        "probability that an anchor's co-occurrence partner is in the image"))
    out_of_scene_prob: float = field(default=0.08, metadata=_help(
        "probability that one category of another scene is in the image"))
    min_categories: int = field(default=2, metadata=_help(
        "fewest categories per image (filled with same-scene categories of unused pairs)"))
    count_weights: tuple[float, ...] = field(default=(0.6, 0.25, 0.15), metadata=_help(
        "P(1 instance), P(2 instances), P(3 instances), ... of a present category"))
    max_instances: int = field(default=8, metadata=_help("most object instances per image"))
    typical_color_prob: float = field(default=0.8, metadata=_help(
        "probability that an instance has its category's typical colour (else another palette "
        "colour, uniformly)"))
    color_jitter: int = field(default=12, metadata=_help("uniform +- RGB jitter per instance"))
    occlusion_prob: float = field(default=0.15, metadata=_help(
        "probability that an instance is placed over an object of another category"))
    max_occlusion: float = field(default=0.3, metadata=_help(
        "largest fraction of an object's pixels that later objects may cover"))
    clutter_max: int = field(default=4, metadata=_help(
        "clutter strokes per image: uniform 0..clutter_max, 1-px lines under the objects"))
    noise_sigma: float = field(default=16.0, metadata=_help(
        "Gaussian pixel noise standard deviation (0-255 scale)"))
    placement_tries: int = field(default=80, metadata=_help(
        "random positions tried per instance before it is dropped"))
    captions_per_image: int = field(default=5, metadata=_help("captions written per image"))
    pope_images: int = field(default=500, metadata=_help(
        "images per POPE question file and split (capped by the images with >= 3 categories)"))
    mme_images_per_task: int = field(default=30, metadata=_help(
        "images per MME subtask (existence, count, position, color), 2 questions each"))

    def __post_init__(self) -> None:
        def fail(name: str, fix: str) -> None:
            raise ValueError(f"WorldConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        for name in ("world_seed", "color_jitter", "clutter_max", "pope_images",
                     "mme_images_per_task"):
            if getattr(self, name) < 0:
                fail(name, "use a value >= 0")
        if not 32 <= self.image_size <= 512:
            fail("image_size", "use 32 <= image_size <= 512")
        if self.size_min < 6:
            fail("size_min", "use size_min >= 6 (smaller glyphs are unreadable)")
        if not self.size_min <= self.size_max <= self.image_size // 2:
            fail("size_max", f"use size_min ({self.size_min}) <= size_max <= image_size // 2 "
                             f"({self.image_size // 2})")
        for name in ("anchor_weights", "count_weights"):
            w = getattr(self, name)
            if not isinstance(w, tuple) or not w or any(x < 0 for x in w) or not math.isclose(
                    sum(w), 1.0, abs_tol=1e-6):
                fail(name, "use a non-empty tuple of non-negative probabilities summing to 1")
        if len(self.anchor_weights) > 3:
            fail("anchor_weights", "a scene has 3 pairs: give at most 3 probabilities")
        for name in ("partner_prob", "out_of_scene_prob", "typical_color_prob",
                     "occlusion_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "use a probability in [0, 1]")
        if not 0.0 <= self.max_occlusion < 1.0:
            fail("max_occlusion", "use a fraction in [0, 1)")
        if not 1 <= self.min_categories <= 6:
            fail("min_categories", "use 1 <= min_categories <= 6 (a scene has 6 categories)")
        if self.max_instances < 2 * len(self.anchor_weights) + 1:
            fail("max_instances", f"use max_instances >= {2 * len(self.anchor_weights) + 1} so "
                                  "every drawn category keeps one instance")
        if self.noise_sigma < 0:
            fail("noise_sigma", "use noise_sigma >= 0")
        if self.placement_tries < 1:
            fail("placement_tries", "use placement_tries >= 1")
        if self.captions_per_image < 1:
            fail("captions_per_image", "use captions_per_image >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"WorldConfig got unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Category:
    name: str
    coco_id: int
    supercategory: str
    scene: str
    color: str  # typical colour, a PALETTE name


@dataclass(frozen=True)
class Scene:
    name: str
    bands: tuple[tuple[int, int, int], tuple[int, int, int], float]
    categories: tuple[str, ...]


@dataclass(frozen=True)
class World:
    """The fixed structure of a world: categories, scenes and the partner of every category."""

    categories: tuple[Category, ...]
    scenes: tuple[Scene, ...]
    pairs: tuple[tuple[str, str], ...]
    world_seed: int

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise ValueError(f"category={name!r} is not in this world; known: "
                         f"{[c.name for c in self.categories]}")

    def scene(self, name: str) -> Scene:
        for s in self.scenes:
            if s.name == name:
                return s
        raise ValueError(f"scene={name!r} is not in this world; known: "
                         f"{[s.name for s in self.scenes]}")

    def partner(self, name: str) -> str:
        for a, b in self.pairs:
            if name == a:
                return b
            if name == b:
                return a
        raise ValueError(f"category={name!r} has no partner in this world")

    def scene_pairs(self, scene: str) -> tuple[tuple[str, str], ...]:
        cats = set(self.scene(scene).categories)
        return tuple(p for p in self.pairs if p[0] in cats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_seed": self.world_seed,
            "categories": [dataclasses.asdict(c) for c in self.categories],
            "scenes": [{"name": s.name, "background_top": list(s.bands[0]),
                        "background_bottom": list(s.bands[1]), "horizon": s.bands[2],
                        "categories": list(s.categories)} for s in self.scenes],
            "pairs": [list(p) for p in self.pairs],
            "palette": {k: list(v) for k, v in PALETTE.items()},
        }


def _random_matching(rng: np.random.Generator, items: list[str],
                     avoid: set[frozenset[str]]) -> list[tuple[str, str]]:
    # Rejection sampling over the 15 perfect matchings of 6 items; 8 of them avoid a given one.
    while True:
        order = [items[i] for i in rng.permutation(len(items))]
        pairs = [(order[i], order[i + 1]) for i in range(0, len(order), 2)]
        if not any(frozenset(p) in avoid for p in pairs):
            return sorted(tuple(sorted(p, key=items.index)) for p in pairs)


def build_world(config: WorldConfig) -> World:
    """The world's categories, scenes and partners; only ``config.world_seed`` changes partners."""
    categories: list[Category] = []
    scenes: list[Scene] = []
    pairs: list[tuple[str, str]] = []
    rng = np.random.default_rng([config.world_seed, _WORLD_KEY])
    for scene_name, (bands, scene_pairs) in SCENES.items():
        names = []
        for pair in scene_pairs:
            for name, color in pair:
                coco_id, supercategory = COCO_CATEGORIES[name]
                categories.append(Category(name, coco_id, supercategory, scene_name, color))
                names.append(name)
        scenes.append(Scene(scene_name, bands, tuple(names)))
        curated = [(a[0], b[0]) for a, b in scene_pairs]
        if config.world_seed == 0:
            pairs.extend(curated)
        else:
            pairs.extend(_random_matching(rng, names, {frozenset(p) for p in curated}))
    return World(tuple(categories), tuple(scenes), tuple(pairs), config.world_seed)


@dataclass(frozen=True)
class PlacedObject:
    """One object instance: glyph rect (x, y, w, h), colour, and its visible part after occlusion."""

    category: str
    color: str
    rgb: tuple[int, int, int]
    x: int
    y: int
    w: int
    h: int
    bbox: tuple[int, int, int, int]  # COCO [x, y, w, h] of the visible pixels
    area: int  # visible pixels
    full_area: int  # pixels of the glyph before occlusion
    mask: np.ndarray = field(repr=False, compare=False)  # (size, size) bool, visible pixels


@dataclass(frozen=True)
class Layout:
    """Everything needed to render and annotate one image; objects in draw order."""

    scene: str
    size: int
    objects: tuple[PlacedObject, ...]
    clutter: tuple[tuple[int, int, int, int, tuple[int, int, int]], ...]
    noise_sigma: float
    noise_seed: int

    @property
    def categories(self) -> list[str]:
        """Categories present, in order of first appearance in draw order (annotation order)."""
        return list(dict.fromkeys(o.category for o in self.objects))


def image_rng(seed: int, split_key: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of a split: independent of every other image."""
    if seed < 0:
        raise ValueError(f"seed={seed} is negative; use a seed >= 0")
    return np.random.default_rng([seed, split_key, index])


def _draw_categories(world: World, config: WorldConfig, rng: np.random.Generator,
                     scene: str) -> list[str]:
    pairs = list(world.scene_pairs(scene))
    k = 1 + int(rng.choice(len(config.anchor_weights), p=config.anchor_weights))
    chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), size=k, replace=False))]
    cats: list[str] = []
    for pair in chosen:
        anchor = int(rng.integers(2))
        cats.append(pair[anchor])
        if rng.random() < config.partner_prob:
            cats.append(pair[1 - anchor])
    if rng.random() < config.out_of_scene_prob:
        others = [c.name for c in world.categories if c.scene != scene]
        cats.append(others[int(rng.integers(len(others)))])
    unused = [p for p in pairs if p not in chosen]
    while len(cats) < config.min_categories and unused:
        pair = unused.pop(int(rng.integers(len(unused))))
        cats.append(pair[int(rng.integers(2))])
    return cats


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def sample_layout(world: World, config: WorldConfig, rng: np.random.Generator) -> Layout:
    """Draw one image's layout (see the module docstring for the process)."""
    size = config.image_size
    scene = world.scenes[int(rng.integers(len(world.scenes)))]
    cats = _draw_categories(world, config, rng, scene.name)
    counts = [1 + int(rng.choice(len(config.count_weights), p=config.count_weights))
              for _ in cats]
    while sum(counts) > config.max_instances:
        multi = [i for i, n in enumerate(counts) if n > 1]
        counts[multi[int(rng.integers(len(multi)))]] -= 1
    instances = [c for c, n in zip(cats, counts) for _ in range(n)]
    instances = [instances[i] for i in rng.permutation(len(instances))]

    palette = list(PALETTE)
    owner = np.full((size, size), -1, dtype=np.int16)  # top-most object per pixel
    placed: list[dict[str, Any]] = []
    for name in instances:
        typical = world.category(name).color
        if rng.random() < config.typical_color_prob:
            color = typical
        else:
            others = [c for c in palette if c != typical]
            color = others[int(rng.integers(len(others)))]
        jitter = rng.integers(-config.color_jitter, config.color_jitter + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.asarray(PALETTE[color]) + jitter, 0, 255))
        w, h = glyph_dims(name, int(rng.integers(config.size_min, config.size_max + 1)))
        glyph = glyph_coverage(name, w, h) >= 0.5
        full = np.zeros((size, size), dtype=bool)
        targets = [j for j, p in enumerate(placed) if p["category"] != name]
        occlude = bool(targets) and config.max_occlusion > 0 and rng.random() < config.occlusion_prob
        spot = None
        for attempt in range(config.placement_tries):
            if occlude and attempt < config.placement_tries // 2:
                t = placed[targets[int(rng.integers(len(targets)))]]
                x = int(np.clip(t["x"] + rng.integers(-w + 2, t["w"] - 1), 1, size - w - 1))
                y = int(np.clip(t["y"] + rng.integers(-h + 2, t["h"] - 1), 1, size - h - 1))
            else:
                x = int(rng.integers(1, size - w))
                y = int(rng.integers(1, size - h))
            full[:] = False
            full[y:y + h, x:x + w] = glyph
            if _fits(full, owner, placed, name, occlude, config.max_occlusion):
                spot = (x, y)
                break
        if spot is None:
            continue  # could not place: the instance is dropped
        x, y = spot
        idx = len(placed)
        owner[full] = idx
        placed.append({"category": name, "color": color, "rgb": rgb, "x": x, "y": y, "w": w,
                       "h": h, "full_area": int(glyph.sum())})
        for j, p in enumerate(placed):
            p["visible"] = int((owner == j).sum())

    objects = []
    for j, p in enumerate(placed):
        mask = owner == j
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1))
        mask.setflags(write=False)
        objects.append(PlacedObject(p["category"], p["color"], p["rgb"], p["x"], p["y"], p["w"],
                                    p["h"], bbox, int(mask.sum()), p["full_area"], mask))

    clutter = []
    top, bottom, horizon = scene.bands
    for _ in range(int(rng.integers(0, config.clutter_max + 1))):
        x0, y0 = (int(v) for v in rng.integers(0, size, size=2))
        angle = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(6, 20)
        x1 = int(round(x0 + length * math.cos(angle)))
        y1 = int(round(y0 + length * math.sin(angle)))
        base = np.asarray(top if y0 < round(horizon * size) else bottom)
        shift = int(rng.integers(30, 61)) * (1 if rng.random() < 0.5 else -1)
        rgb = tuple(int(v) for v in np.clip(base + shift, 0, 255))
        clutter.append((x0, y0, x1, y1, rgb))
    noise_seed = int(rng.integers(2**63 - 1))
    return Layout(scene.name, size, tuple(objects), tuple(clutter), float(config.noise_sigma),
                  noise_seed)


def _fits(full: np.ndarray, owner: np.ndarray, placed: list[dict[str, Any]], name: str,
          occlude: bool, max_occlusion: float) -> bool:
    halo = _dilate(full)
    touched = np.unique(owner[halo])
    touched = touched[touched >= 0]
    if touched.size == 0:
        return True
    if not occlude:
        return False
    for j in touched:
        p = placed[j]
        if p["category"] == name:
            return False  # same-category instances never touch: counts stay well defined
        covered = int((full & (owner == j)).sum())
        if covered == 0:
            return False  # touching without overlap only merges two outlines; not an occlusion
        if p["visible"] - covered < (1.0 - max_occlusion) * p["full_area"]:
            return False
    return True
