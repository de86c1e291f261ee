"""SynthCOCO language: positions, noun phrases, reference captions and MME question pairs.

Contract:
- Every function is pure given its arguments (randomness comes in as a numpy ``Generator``).
- Captions are lowercase, tokens separated by single spaces, punctuation as its own token
  ("a kitchen with two cups on the left and a fork ."), and mention EVERY category present with
  its count; colour and position are added where they are well defined (all instances of the
  category share the colour / the 3x3 region). The only object words are the COCO category names
  and their plurals, so the CHAIR synonym table maps them unchanged; no other word of a caption
  is a CHAIR synonym (no "table", "seat", "bow", "ball", "container", "monitor", ...).
- Positions come from the centre of the visible box: 3x3 regions of the image (thirds).
- MME pairs are ``[(question, "Yes"), (question, "No")]``, each question ending with
  " Please answer yes or no.", or ``None`` when the image does not support the subtask.
"""

from __future__ import annotations

import numpy as np

from .render import PALETTE
from .world import Layout, PlacedObject, World

__all__ = [
    "MME_TASKS",
    "MME_SUFFIX",
    "NUMBERS",
    "PLURALS",
    "plural",
    "with_article",
    "region",
    "region_phrase",
    "side",
    "captions",
    "mme_pair",
]

MME_TASKS = ("existence", "count", "position", "color")
MME_SUFFIX = " Please answer yes or no."

PLURALS = {"knife": "knives", "couch": "couches", "wine glass": "wine glasses", "tv": "tvs"}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_PREPOSITIONS = {"street": "on", "beach": "on"}  # else "in" (in the kitchen, in the living room)
_REGIONS = (("at the top left", "at the top", "at the top right"),
            ("on the left", "in the center", "on the right"),
            ("at the bottom left", "at the bottom", "at the bottom right"))


def plural(name: str) -> str:
    """English plural of a category name ("knife" -> "knives", "stop sign" -> "stop signs")."""
    return PLURALS.get(name, name + "s")


def with_article(phrase: str) -> str:
    """'a' or 'an' before ``phrase`` by its first letter ("an umbrella", "a red umbrella")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _center(obj: PlacedObject) -> tuple[float, float]:
    x, y, w, h = obj.bbox
    return x + w / 2, y + h / 2


def region(obj: PlacedObject, size: int) -> tuple[int, int]:
    """(row, col) in the 3x3 grid of thirds that holds the centre of the object's visible box."""
    cx, cy = _center(obj)
    return min(2, int(3 * cy / size)), min(2, int(3 * cx / size))


def region_phrase(obj: PlacedObject, size: int) -> str:
    row, col = region(obj, size)
    return _REGIONS[row][col]


def side(obj: PlacedObject, size: int, axis: str) -> str | None:
    """'left'/'right' (axis 'x') or 'top'/'bottom' (axis 'y') when the centre lies clearly on one
    side (outside the middle 20% band), else None."""
    cx, cy = _center(obj)
    c = cx if axis == "x" else cy
    low, high = ("left", "right") if axis == "x" else ("top", "bottom")
    if c < 0.4 * size:
        return low
    if c > 0.6 * size:
        return high
    return None


def _group(layout: Layout) -> dict[str, list[PlacedObject]]:
    groups: dict[str, list[PlacedObject]] = {}
    for o in layout.objects:
        groups.setdefault(o.category, []).append(o)
    return groups


def _noun_phrase(name: str, objs: list[PlacedObject], size: int, color: bool, pos: bool) -> str:
    n = len(objs)
    words = []
    colors = {o.color for o in objs}
    if color and len(colors) == 1:
        words.append(next(iter(colors)))
    words.append(name if n == 1 else plural(name))
    phrase = " ".join(words)
    phrase = with_article(phrase) if n == 1 else f"{NUMBERS[n]} {phrase}"
    regions = {region_phrase(o, size) for o in objs}
    if pos and len(regions) == 1:
        phrase += " " + next(iter(regions))
    return phrase


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return " , ".join(items[:-1]) + " and " + items[-1]


def _relation(groups: dict[str, list[PlacedObject]], size: int,
              rng: np.random.Generator) -> str | None:
    singles = [(name, objs[0]) for name, objs in groups.items() if len(objs) == 1]
    pairs = [(a, b) for a in singles for b in singles
             if a[0] != b[0] and _center(b[1])[0] - _center(a[1])[0] > size / 4]
    if not pairs:
        return None
    (a, _), (b, _) = pairs[int(rng.integers(len(pairs)))]
    return f"the {a} is to the left of the {b}"


def captions(layout: Layout, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` reference captions of a layout, each mentioning every object with its count."""
    groups = _group(layout)
    size = layout.size
    scene = layout.scene
    prep = _PREPOSITIONS.get(scene, "in")
    names = list(groups)

    def phrases(color: bool, pos: bool) -> list[str]:
        order = [names[i] for i in rng.permutation(len(names))]
        return [_noun_phrase(c, groups[c], size, color, pos) for c in order]

    def be(first: str) -> str:
        return "is" if first.startswith(("a ", "an ")) else "are"

    templates = list(rng.permutation(5))
    out = []
    for i in range(n):
        t = templates[i % 5]
        if t == 0:
            cap = f"a {scene} with {_join(phrases(False, True))} ."
        elif t == 1:
            ps = phrases(True, False)
            cap = f"there {be(ps[0])} {_join(ps)} {prep} the {scene} ."
        elif t == 2:
            cap = f"{_join(phrases(True, True))} {prep} a {scene} ."
        elif t == 3:
            cap = f"a photo of a {scene} showing {_join(phrases(False, False))} ."
        else:
            ps = phrases(True, False)
            rel = _relation(groups, size, rng)
            cap = f"{prep} this {scene} there {be(ps[0])} {_join(ps)}"
            cap += f" , and {rel} ." if rel else " ."
        out.append(cap)
    return out


def _q(text: str) -> str:
    return text + MME_SUFFIX


def mme_pair(layout: Layout, world: World, task: str,
             rng: np.random.Generator) -> list[tuple[str, str]] | None:
    """One MME yes/no pair for ``task`` (yes first), or None if the image cannot support it.

    existence: a present category / an absent one of the same scene (any absent one if none);
    count: its true count / a count one off (1..max+1); position: a category with ONE instance
    clearly on one side, asked about that side / the opposite one; color: a category whose
    instances share a colour / a colour none of them has, preferring a colour another object of
    the image has (attribute binding, as in real MME colour pairs).
    """
    if task not in MME_TASKS:
        raise ValueError(f"task={task!r} is not an MME hallucination subtask; use one of {MME_TASKS}")
    groups = _group(layout)
    names = list(groups)
    size = layout.size
    if task == "existence":
        present = names[int(rng.integers(len(names)))]
        scene_cats = world.scene(layout.scene).categories
        absent = [c for c in scene_cats if c not in groups] or [
            c.name for c in world.categories if c.name not in groups]
        neg = absent[int(rng.integers(len(absent)))]
        return [(_q(f"Is there {with_article(present)} in this image?"), "Yes"),
                (_q(f"Is there {with_article(neg)} in this image?"), "No")]
    if task == "count":
        name = names[int(rng.integers(len(names)))]
        n = len(groups[name])
        wrong = [m for m in (n - 1, n + 1) if m >= 1]
        m = wrong[int(rng.integers(len(wrong)))]

        def ask(k: int) -> str:
            if k == 1:
                return _q(f"Is there only one {name} in this image?")
            return _q(f"Are there {NUMBERS[k]} {plural(name)} in this image?")

        return [(ask(n), "Yes"), (ask(m), "No")]
    if task == "position":
        options = []
        for name, objs in groups.items():
            if len(objs) != 1:
                continue
            for axis in ("x", "y"):
                s = side(objs[0], size, axis)
                if s is not None:
                    options.append((name, s))
        if not options:
            return None
        name, s = options[int(rng.integers(len(options)))]
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[s]

        def where(w: str) -> str:
            if w in ("left", "right"):
                return _q(f"Is the {name} on the {w} side of this image?")
            return _q(f"Is the {name} at the {w} of this image?")

        return [(where(s), "Yes"), (where(opposite), "No")]
    # color
    options = [name for name, objs in groups.items() if len({o.color for o in objs}) == 1]
    if not options:
        return None
    name = options[int(rng.integers(len(options)))]
    color = groups[name][0].color
    in_image = sorted({o.color for o in layout.objects if o.category != name} - {color})
    wrong = in_image or [c for c in PALETTE if c != color]
    neg = wrong[int(rng.integers(len(wrong)))]
    return [(_q(f"Is there {with_article(color + ' ' + name)} in this image?"), "Yes"),
            (_q(f"Is there {with_article(neg + ' ' + name)} in this image?"), "No")]
