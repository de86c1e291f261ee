"""SynthCOCO: a synthetic COCO-format world with known ground truth, for measuring hallucination.

Contract:
- :func:`generate_world` writes, under ``out_dir``::

      images/{split}/synthcoco_{split}_{image_id:012d}.png   64x64 RGB (PNG, lossless)
      annotations/instances_{split}.json   COCO instances: real COCO category ids, names and
                                           supercategories; bbox/area/segmentation (uncompressed
                                           RLE) of the VISIBLE pixels; extra keys per annotation:
                                           "color", "rgb", "region" [row, col] of the 3x3 grid,
                                           "occluded" (fraction covered); per image: "scene"
      annotations/captions_{split}.json    COCO captions, ``captions_per_image`` per image
      pope/{split}/coco_pope_{random,popular,adversarial}.json
                                           JSON lines built by the harness's POPE builder
                                           (veridical.evals.pope), <= pope_images images each
      mme/{existence,count,position,color}/{stem}.png + {stem}.txt
                                           MME layout, from the "test" split (else the last split)
      manifest.json                        config, world, seed, splits, counts, statistics, sha256
                                           of every annotation/question file and a digest per
                                           image folder

  and returns the manifest dict. Same (config, seed, splits) -> byte-identical files.
- Two seeds: ``WorldConfig.world_seed`` (``--world-seed``) fixes the WORLD: which categories are
  co-occurrence partners (0 = the curated pairing of the shipped world; any other value = a
  different random pairing in every scene). ``seed`` (``--seed``) fixes the IMAGES drawn from that
  world: every image has its own random stream keyed by (seed, split name, index), so image i of
  "test" does not depend on the other splits or on the split sizes.
- Image ids are ``key * 1_000_000 + index + 1`` with key 1/2/3 for train/val/test (other split
  names: a stable key from the name), so ids never collide across splits (CHAIR merges splits).
- :func:`builtin_world` ``(split) -> Path``: the shipped world (``builtin:synthcoco``: the
  default WorldConfig, seed ``BUILTIN_SEED``, ``BUILTIN_SPLITS`` sizes), one split generated once
  into the cache folder (``$VERIDICAL_CACHE``, default ``~/.cache/veridical``) and reused.
- :func:`add_subcommands` registers ``veridical world generate``.

See ``veridical.world.world`` (the generative process and WorldConfig), ``.render`` (glyphs,
pixels), ``.text`` (captions, MME questions); ``veridical.world`` also gives the built-in world
(:func:`~veridical.world.builtin_world`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from veridical.cache import cache_dir
from veridical.errors import InputError

from .render import PALETTE, render_layout
from .text import MME_TASKS, captions, mme_pair, region
from .world import Layout, World, WorldConfig, build_world, image_rng, sample_layout

__all__ = [
    "GENERATOR_VERSION",
    "BUILTIN_SEED",
    "BUILTIN_SPLITS",
    "WorldConfig",
    "World",
    "build_world",
    "sample_layout",
    "render_layout",
    "generate_world",
    "generate_split",
    "generate_pope",
    "blind_scene_answers",
    "generate_mme",
    "cooccurrence_stats",
    "split_key",
    "BUILTIN_DATA",
    "resolve_data",
    "builtin_world",
    "add_subcommands",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
# The manifest's "generator" id: the module's name when the format was fixed (it moved to
# veridical.world.generate since); kept, so that a world's files stay byte-identical.
GENERATOR = "veridical.evals.synthcoco"
POPE_SPLITS = ("random", "popular", "adversarial")
# The shipped world (builtin:synthcoco): default WorldConfig, this image seed and these sizes.
# Images depend only on (seed, split, index), so any subset of the splits can be regenerated.
BUILTIN_DATA = "builtin:synthcoco"
BUILTIN_SEED = 0
BUILTIN_SPLITS = {"train": 20000, "val": 500, "test": 1000}
_MAX_SPLIT = 999_999
_FIXED_KEYS = {"train": 1, "val": 2, "test": 3}
_PURPOSE_CAPTIONS = 1
_PURPOSE_MME = 2


def split_key(split: str) -> int:
    """Stable integer key of a split name (train 1, val 2, test 3, others 10..999 from a CRC)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split or ""):
        raise ValueError(f"split name {split!r} is not usable in file names; use letters, digits, "
                         "'_' or '-' (e.g. 'train', 'val', 'test')")
    return _FIXED_KEYS.get(split, 10 + zlib.crc32(split.encode()) % 990)


def _image_id(split: str, index: int) -> int:
    return split_key(split) * 1_000_000 + index + 1


def _file_name(split: str, image_id: int) -> str:
    return f"synthcoco_{split}_{image_id:012d}.png"


def _rle(mask: np.ndarray) -> dict[str, Any]:
    # COCO uncompressed RLE: column-major runs, starting with a (possibly empty) run of zeros.
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _annotations(layout: Layout, image_id: int, world: World) -> list[dict[str, Any]]:
    out = []
    for k, o in enumerate(layout.objects):
        cat = world.category(o.category)
        out.append({
            "id": image_id * 100 + k,
            "image_id": image_id,
            "category_id": cat.coco_id,
            "bbox": [float(v) for v in o.bbox],
            "area": float(o.area),
            "iscrowd": 0,
            "segmentation": _rle(o.mask),
            "color": o.color,
            "rgb": list(o.rgb),
            "region": list(region(o, layout.size)),
            "occluded": round(1.0 - o.area / o.full_area, 4),
        })
    return out


def _categories(world: World) -> list[dict[str, Any]]:
    return [{"id": c.coco_id, "name": c.name, "supercategory": c.supercategory}
            for c in sorted(world.categories, key=lambda c: c.coco_id)]


def _info(kind: str) -> dict[str, Any]:
    return {"description": f"SynthCOCO {kind} (veridical world generator v{GENERATOR_VERSION})",
            "version": GENERATOR_VERSION, "contributor": "veridical", "url": "", "year": 0,
            "date_created": ""}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr, mode="RGB").save(path, format="PNG", compress_level=6)


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img")


def _check_splits(splits: Mapping[str, int]) -> None:
    if not splits:
        raise ValueError("splits={} is empty; give sizes such as {'train': 5000, 'test': 1000}")
    keys: dict[int, str] = {}
    for name, n in splits.items():
        key = split_key(name)
        if key in keys:
            raise ValueError(f"splits {keys[key]!r} and {name!r} map to the same image-id key; "
                             "rename one of them")
        keys[key] = name
        if not isinstance(n, int) or not 0 <= n <= _MAX_SPLIT:
            raise ValueError(f"splits[{name!r}]={n!r} is invalid; use an integer in "
                             f"[0, {_MAX_SPLIT}]")


def generate_split(out_dir: Path, world: World, config: WorldConfig, seed: int, split: str,
                   n: int, *, progress: bool = False) -> dict[str, Any]:
    """Render one split: images, instances and captions JSON. Returns its counts and digest."""
    key = split_key(split)
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    digest = hashlib.sha256()
    for i in _progress(range(n), n, f"synthcoco {split}", progress):
        image_id = _image_id(split, i)
        layout = sample_layout(world, config, image_rng(seed, key, i))
        pixels = render_layout(layout, world.scene(layout.scene).bands)
        name = _file_name(split, image_id)
        _save_png(pixels, img_dir / name)
        digest.update(name.encode() + b"\0" + hashlib.sha256((img_dir / name).read_bytes()).digest())
        images.append({"id": image_id, "file_name": name, "width": layout.size,
                       "height": layout.size, "scene": layout.scene})
        anns.extend(_annotations(layout, image_id, world))
        cap_rng = np.random.default_rng([seed, key, i, _PURPOSE_CAPTIONS])
        for k, text in enumerate(captions(layout, config.captions_per_image, cap_rng)):
            caps.append({"id": image_id * 10 + k, "image_id": image_id, "caption": text})
    cats = _categories(world)
    instances = {"info": _info("instances"), "licenses": [], "images": images,
                 "annotations": anns, "categories": cats}
    _write_json(out_dir / "annotations" / f"instances_{split}.json", instances)
    cap_images = [{k: v for k, v in im.items() if k != "scene"} for im in images]
    _write_json(out_dir / "annotations" / f"captions_{split}.json",
                {"info": _info("captions"), "licenses": [], "images": cap_images,
                 "annotations": caps})
    return {"images": n, "annotations": len(anns), "captions": len(caps),
            "images_sha256": digest.hexdigest(), "stats": cooccurrence_stats(instances, world)}


def blind_scene_answers(questions: Iterable[Mapping[str, Any]], instances: Mapping[str, Any],
                        world: World) -> list[str]:
    """Answers of the blind scene-only baseline to POPE questions: "yes" exactly when the asked
    object belongs to the image's scene type (which the background gives away), whatever the
    image holds. A model must beat it, on adversarial questions above all, to show it looks at
    objects."""
    scene = {im["file_name"]: im["scene"] for im in instances["images"]}
    names = sorted((c.name for c in world.categories), key=len, reverse=True)
    out = []
    for q in questions:
        text = q["text"]
        obj = next((n for n in names if f" {n} " in f" {text} "), None)
        if obj is None:
            raise ValueError(f"question {q.get('question_id')!r} ({text!r}) names no category of "
                             "this world; pass questions built from this world's instances")
        out.append("yes" if world.category(obj).scene == scene[q["image"]] else "no")
    return out


def generate_pope(out_dir: str | Path, split: str, seed: int, num_images: int,
                  world: World | None = None) -> dict[str, Any]:
    """POPE question files of one split (random, popular, adversarial) from its instances JSON,
    built by the harness's own builder (``veridical.evals.pope``: ``build_all_splits``, the one
    seeded draw behind ``build_questions``) and written as JSON lines by its ``write_questions``.

    ``num_images`` is capped by the images with >= 3 categories. Returns
    ``{"images": n, "questions": {pope_split: count}}`` plus, when ``world`` is given, the blind
    scene-only baseline's metrics per file (``blind_scene_baseline``); or ``{"skipped": reason}``
    when the split has too few eligible images. Raises ImportError if the harness is missing.
    """
    # one POPE definition: the harness's (an optional dependency of the world, imported here)
    from veridical.evals.pope import build_all_splits, pope_metrics, write_questions

    out_dir = Path(out_dir)
    instances = json.loads((out_dir / "annotations" / f"instances_{split}.json").read_text())
    per_image = 3
    cats_per_image: dict[int, set[int]] = {}
    for a in instances["annotations"]:
        cats_per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    eligible = sum(len(c) >= per_image for c in cats_per_image.values())
    n = min(num_images, eligible)
    if n < 1:
        return {"skipped": f"no image of split {split!r} has >= {per_image} categories"}
    try:
        records = build_all_splits(instances, num_images=n, per_image=per_image, seed=seed)
    except ValueError as exc:  # e.g. a tiny split leaves no negative to draw
        return {"skipped": str(exc)}
    result: dict[str, Any] = {"images": n, "questions": {}}
    blind = {}
    for pope_split in POPE_SPLITS:
        recs = records[pope_split]
        write_questions(recs, out_dir / "pope" / split / f"coco_pope_{pope_split}.json")
        result["questions"][pope_split] = len(recs)
        if world is not None:
            m = pope_metrics(blind_scene_answers(recs, instances, world), [r["label"] for r in recs])
            blind[pope_split] = {k: round(float(m[k]), 4) for k in ("accuracy", "f1", "yes_ratio")}
    if blind:
        result["blind_scene_baseline"] = blind
    return result


def generate_mme(out_dir: str | Path, world: World, config: WorldConfig, seed: int, split: str,
                 n_images: int, per_task: int) -> dict[str, int]:
    """MME-layout folders ``mme/{existence,count,position,color}`` from images of ``split``.

    Per subtask, ``per_task`` images are drawn (seeded) among those that support it; each gets a
    copy of its PNG and ``{stem}.txt``: two lines ``question<TAB>Yes|No`` (yes first, no final
    newline). Layouts are re-sampled from the seed, so no image has to be decoded.
    """
    out_dir = Path(out_dir)
    key = split_key(split)
    layouts: dict[int, Layout] = {}  # re-sampled on demand: the same layouts the images have

    def layout(i: int) -> Layout:
        if i not in layouts:
            layouts[i] = sample_layout(world, config, image_rng(seed, key, i))
        return layouts[i]

    counts = {}
    for t, task in enumerate(MME_TASKS):
        task_dir = out_dir / "mme" / task
        if task_dir.exists():
            shutil.rmtree(task_dir)
        task_dir.mkdir(parents=True)
        rng = np.random.default_rng([seed, key, _PURPOSE_MME, t])
        pairs = {}
        for i in rng.permutation(n_images):
            if len(pairs) == per_task:
                break
            pair = mme_pair(layout(int(i)), world, task, rng)
            if pair is not None:
                pairs[int(i)] = pair
        for i in sorted(pairs):
            name = _file_name(split, _image_id(split, i))
            shutil.copyfile(out_dir / "images" / split / name, task_dir / name)
            lines = [f"{q}\t{a}" for q, a in pairs[i]]
            (task_dir / (Path(name).stem + ".txt")).write_text("\n".join(lines), encoding="utf-8")
        counts[task] = len(pairs)
    return counts


def cooccurrence_stats(instances: Mapping[str, Any], world: World) -> dict[str, Any]:
    """Measured co-occurrence of a COCO instances dict in ``world``.

    For every (image, present category X): the share of X's partner present, of X's same-scene
    non-partners present, of other-scene categories present; averaged over those pairs. Plus
    images with an out-of-scene category, categories and instances per image, POPE-eligible
    images (>= 3 categories), the instance count distribution and occluded-instance share.
    """
    id_to_name = {c["id"]: c["name"] for c in instances["categories"]}
    per_image: dict[int, dict[str, int]] = {im["id"]: {} for im in instances["images"]}
    scene_of = {im["id"]: im.get("scene") for im in instances["images"]}
    occluded = 0
    for a in instances["annotations"]:
        cats = per_image[a["image_id"]]
        name = id_to_name[a["category_id"]]
        cats[name] = cats.get(name, 0) + 1
        occluded += a.get("occluded", 0) > 0
    partner, same, other = [], [], []
    oos_images = 0
    counts: dict[int, int] = {}
    for image_id, cats in per_image.items():
        present = set(cats)
        scene = scene_of[image_id]
        if scene is not None and any(world.category(c).scene != scene for c in present):
            oos_images += 1
        for n in cats.values():
            counts[n] = counts.get(n, 0) + 1
        for x in present:
            cx = world.category(x)
            p = world.partner(x)
            partner.append(p in present)
            mates = [c for c in world.scene(cx.scene).categories if c not in (x, p)]
            same.append(np.mean([m in present for m in mates]))
            outs = [c.name for c in world.categories if c.scene != cx.scene]
            other.append(np.mean([m in present for m in outs]))
    n_images = max(1, len(per_image))
    n_ann = len(instances["annotations"])
    return {
        "p_partner_given_present": round(float(np.mean(partner)), 4) if partner else None,
        "p_same_scene_nonpartner_given_present": round(float(np.mean(same)), 4) if same else None,
        "p_other_scene_given_present": round(float(np.mean(other)), 4) if other else None,
        "images_with_out_of_scene": round(oos_images / n_images, 4),
        "categories_per_image": round(sum(len(c) for c in per_image.values()) / n_images, 4),
        "instances_per_image": round(n_ann / n_images, 4),
        "images_with_3plus_categories": sum(len(c) >= 3 for c in per_image.values()),
        "instance_count_distribution": {str(k): counts[k] for k in sorted(counts)},
        "occluded_instance_share": round(occluded / max(1, n_ann), 4),
    }


def _prepare_out(out: Path) -> None:
    # Regenerating into a previous world's folder replaces it, so no stale file survives; any
    # other non-empty folder is refused rather than written into or cleaned.
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            ours = json.loads(manifest.read_text())["generator"] == GENERATOR
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"out_dir={str(out)!r} is not empty and holds no SynthCOCO "
                             "manifest.json; choose an empty or new folder")
        for sub in ("images", "annotations", "pope", "mme"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        manifest.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_world(out_dir: str | Path, config: WorldConfig, seed: int,
                   splits: Mapping[str, int], *, progress: bool | None = None,
                   mme_split: str | None = None) -> dict[str, Any]:
    """Write a SynthCOCO world (see the module docstring) and return its manifest.

    ``progress``: tqdm bars per split; None = on when the splits hold >= 1000 images.
    ``mme_split``: split the MME folder is drawn from; None = "test" if present, else the last.
    POPE files need ``veridical.evals.pope``; if that module is missing they are skipped with a
    warning and the manifest says so (call :func:`generate_pope` later).
    """
    if not isinstance(config, WorldConfig):
        raise ValueError(f"config={config!r} is not a WorldConfig; build one with WorldConfig(...)")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; use an integer >= 0")
    _check_splits(splits)
    if mme_split is None:
        mme_split = "test" if "test" in splits else list(splits)[-1]
    elif mme_split not in splits:
        raise ValueError(f"mme_split={mme_split!r} is not one of the splits {list(splits)}")
    out = Path(out_dir)
    _prepare_out(out)
    if progress is None:
        progress = sum(splits.values()) >= 1000
    world = build_world(config)

    split_info: dict[str, Any] = {}
    for split, n in splits.items():
        split_info[split] = generate_split(out, world, config, seed, split, n, progress=progress)

    pope_status: dict[str, Any] = {"builder": "veridical.evals.pope.build_all_splits",
                                   "per_image": 3, "seed": seed, "splits": {}}
    if config.pope_images > 0:
        try:
            for split in splits:
                result = generate_pope(out, split, seed, config.pope_images, world)
                pope_status["splits"][split] = result
                if "skipped" in result:
                    logger.warning("POPE files of split %r skipped: %s", split, result["skipped"])
        except ImportError as exc:
            logger.warning("POPE files skipped: %s (run generate_pope once it exists)", exc)
            pope_status["skipped"] = f"veridical.evals.pope not importable: {exc}"
    else:
        pope_status["skipped"] = "pope_images=0"

    mme_counts: dict[str, int] = {}
    if config.mme_images_per_task > 0 and splits[mme_split] > 0:
        mme_counts = generate_mme(out, world, config, seed, mme_split, splits[mme_split],
                                  config.mme_images_per_task)

    files = {}
    for path in sorted(p for sub in ("annotations", "pope") for p in (out / sub).rglob("*")
                       if p.is_file()):
        files[path.relative_to(out).as_posix()] = _sha256(path)
    mme_digest = hashlib.sha256()
    mme_files = sorted(p for p in (out / "mme").rglob("*") if p.is_file()) if (
        out / "mme").exists() else []
    for p in mme_files:
        mme_digest.update(p.relative_to(out).as_posix().encode() + b"\0" +
                          hashlib.sha256(p.read_bytes()).digest())

    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "config": config.to_dict(),
        "world": world.to_dict(),
        "splits": dict(splits),
        "counts": {s: {k: v for k, v in info.items() if k not in ("images_sha256", "stats")}
                   for s, info in split_info.items()},
        "stats": {s: info["stats"] for s, info in split_info.items()},
        "images_sha256": {s: info["images_sha256"] for s, info in split_info.items()},
        "pope": pope_status,
        "mme": {"split": mme_split, "images_per_task": mme_counts,
                "sha256": mme_digest.hexdigest() if mme_files else None},
        "files": files,
        "palette": {k: list(v) for k, v in PALETTE.items()},
        # byte identity holds for the same numpy (random streams) and Pillow/zlib (PNG bytes)
        "versions": {"numpy": np.__version__, "Pillow": PIL.__version__},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def builtin_world(split: str = "test") -> Path:
    """The folder of the shipped world's ``split`` (``BUILTIN_DATA``: default WorldConfig, seed
    ``BUILTIN_SEED``, ``BUILTIN_SPLITS`` sizes), generated once into the cache folder
    (``veridical.cache.cache_dir()``) on first use; InputError for an unknown split."""
    if split not in BUILTIN_SPLITS:
        raise InputError(f"--world-split {split!r} is not a split of {BUILTIN_DATA}; use one "
                         f"of {', '.join(BUILTIN_SPLITS)}")
    folder = cache_dir() / f"synthcoco-v{GENERATOR_VERSION}-seed{BUILTIN_SEED}-{split}"
    if not (folder / "manifest.json").is_file():
        logger.info("generating %s (%s split) into %s", BUILTIN_DATA, split, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        generate_world(tmp, WorldConfig(), BUILTIN_SEED, {split: BUILTIN_SPLITS[split]},
                       progress=True)
        tmp.rename(folder)  # atomic: a half-written world is never used
    return folder


def resolve_data(data: str, split: str = "test") -> str:
    """``data`` with ``BUILTIN_DATA`` replaced by :func:`builtin_world`'s folder (what the
    evaluation, the head profiler and the server take); another ``builtin:`` name is an
    InputError; anything else comes back as given."""
    if data == BUILTIN_DATA:
        return str(builtin_world(split))
    if data.startswith("builtin:"):
        raise InputError(f"unknown built-in data {data!r}; the built-in data set is "
                         f"{BUILTIN_DATA}")
    return data


# ---------------------------------------------------------------- CLI


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of probabilities (e.g. 0.6,0.25,0.15)") from None


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per WorldConfig field (``--partner-prob`` ...), help and default from the field."""
    group = parser.add_argument_group("world parameters (defaults: the shipped world)")
    for f in dataclasses.fields(WorldConfig):
        default = f.default
        kind = _parse_weights if isinstance(default, tuple) else type(default)
        shown = ",".join(str(x) for x in default) if isinstance(default, tuple) else default
        group.add_argument(_flag(f.name), dest=f.name, type=kind, default=default,
                           help=f"{f.metadata.get('help', '')} (default: {shown})")


def config_from_args(args: argparse.Namespace) -> WorldConfig:
    return WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})


def cmd_world_generate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    splits = {name: n for name, n in (("train", args.train), ("val", args.val),
                                      ("test", args.test)) if n > 0}
    manifest = generate_world(args.out, config, args.seed, splits,
                              progress=False if args.quiet else None)
    counts = ", ".join(f"{s} {c['images']}" for s, c in manifest["counts"].items())
    print(f"wrote SynthCOCO world (world seed {config.world_seed}, seed {args.seed}) to "
          f"{args.out}: {counts} images; manifest.json")
    if "skipped" in manifest["pope"]:
        print(f"POPE files skipped: {manifest['pope']['skipped']}")
    return 0


def add_generate_parser(world_subparsers: Any) -> argparse.ArgumentParser:
    gen = world_subparsers.add_parser(
        "generate", help="write a SynthCOCO world: images, COCO json, POPE and MME files",
        description="Write a SynthCOCO world. --world-seed picks the co-occurrence partners "
                    "(0 = the shipped world); --seed picks the images drawn from it.")
    gen.add_argument("--seed", type=int, required=True, help="image seed (>= 0)")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--train", type=int, default=5000, help="train images (default 5000)")
    gen.add_argument("--val", type=int, default=500, help="val images (default 500)")
    gen.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(gen)
    gen.set_defaults(func=cmd_world_generate)
    return gen


def add_subcommands(subparsers: Any) -> Any:
    """Register ``world`` (``generate``, and ``train`` from :mod:`.train`) on a top-level
    argparse subparsers object; return the ``world`` subparsers."""
    from .train import add_world_subcommands

    world = subparsers.add_parser("world", help="the built-in SynthCOCO world")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    add_generate_parser(world_sub)
    add_world_subcommands(world_sub)
    return world_sub
