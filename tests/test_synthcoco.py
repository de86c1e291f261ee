"""SynthCOCO world generator (veridical.world): determinism, pixels vs annotations, file formats,
statistics."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veridical.world import generate as synthcoco
from veridical.world.generate import WorldConfig, build_world, generate_world
from veridical.world.render import GLYPHS, PALETTE, background, glyph_coverage, glyph_dims
from veridical.world.text import MME_SUFFIX, MME_TASKS, plural
from veridical.world.world import COCO_CATEGORIES, SCENES, image_rng, sample_layout

SMALL = {"train": 12, "test": 60}
QUICK = WorldConfig(pope_images=20, mme_images_per_task=6)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthcoco")
    manifest = generate_world(out, QUICK, 7, SMALL)
    return out, manifest


def test_same_seed_same_bytes_other_seed_other_images(world_dir, tmp_path):
    out, manifest = world_dir
    again = generate_world(tmp_path / "again", QUICK, 7, SMALL)
    assert _tree(out) == _tree(tmp_path / "again")
    assert again == manifest
    other = generate_world(tmp_path / "other", QUICK, 8, {"test": 10})
    assert other["images_sha256"]["test"] != manifest["images_sha256"]["test"]


def test_split_images_do_not_depend_on_other_splits(world_dir, tmp_path):
    out, _ = world_dir
    generate_world(tmp_path / "alone", QUICK, 7, {"test": 5})
    for p in sorted((tmp_path / "alone" / "images" / "test").iterdir()):
        assert p.read_bytes() == (out / "images" / "test" / p.name).read_bytes()


def test_manifest_records_hashes_and_config(world_dir):
    out, manifest = world_dir
    assert WorldConfig.from_dict(manifest["config"]) == QUICK
    assert manifest["seed"] == 7 and manifest["splits"] == SMALL
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["counts"]["test"]["images"] == 60


def test_coco_files_use_real_coco_categories(world_dir):
    out, _ = world_dir
    inst = json.loads((out / "annotations" / "instances_test.json").read_text())
    caps = json.loads((out / "annotations" / "captions_test.json").read_text())
    cats = {c["name"]: (c["id"], c["supercategory"]) for c in inst["categories"]}
    assert cats == COCO_CATEGORIES
    assert len(cats) == 24
    ids = [im["id"] for im in inst["images"]]
    assert ids == [3_000_001 + i for i in range(60)]
    assert [im["id"] for im in caps["images"]] == ids
    per_image = {}
    for c in caps["annotations"]:
        per_image[c["image_id"]] = per_image.get(c["image_id"], 0) + 1
    assert set(per_image.values()) == {QUICK.captions_per_image}
    assert len({a["id"] for a in inst["annotations"]}) == len(inst["annotations"])
    for im in inst["images"]:
        assert (out / "images" / "test" / im["file_name"]).is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_annotations_match_rendered_pixels(tmp_path):
    pycoco_mask = pytest.importorskip("pycocotools.mask")
    config = WorldConfig(noise_sigma=0.0, clutter_max=0, pope_images=0, mme_images_per_task=0)
    generate_world(tmp_path, config, 3, {"test": 40})
    world = build_world(config)
    inst = json.loads((tmp_path / "annotations" / "instances_test.json").read_text())
    caps = json.loads((tmp_path / "annotations" / "captions_test.json").read_text())
    name_of = {c["id"]: c["name"] for c in inst["categories"]}
    anns: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    checked = 0
    for im in inst["images"]:
        pixels = np.asarray(Image.open(tmp_path / "images" / "test" / im["file_name"])).astype(int)
        bg = background(world.scene(im["scene"]).bands, 64).astype(int)
        outside = np.ones((64, 64), dtype=bool)
        for a in anns[im["id"]]:
            x, y, w, h = (int(v) for v in a["bbox"])
            outside[y:y + h, x:x + w] = False
            rle = pycoco_mask.frPyObjects(a["segmentation"], 64, 64)
            mask = pycoco_mask.decode(rle).astype(bool)
            assert mask.sum() == a["area"] > 0
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (x, y, w, h)
            # its visible pixels hold the instance's colour: coverage >= 0.5, so each pixel is
            # nearer that colour than the background (thin parts are anti-aliased blends)
            d_obj = np.linalg.norm(pixels[mask] - np.asarray(a["rgb"]), axis=1)
            d_bg = np.linalg.norm(pixels[mask] - bg[mask], axis=1)
            assert (d_obj <= d_bg + 2).mean() >= 0.9, (im["file_name"], name_of[a["category_id"]])
            assert (d_obj <= 6).sum() >= 1 or mask.sum() < 30
            assert np.abs(np.asarray(a["rgb"]) - np.asarray(PALETTE[a["color"]])).max() <= 12
            checked += 1
        # away from every box: background, or a faint (< half) anti-aliasing fringe
        diff = np.abs(pixels[outside] - bg[outside]).max(axis=1)
        assert (diff == 0).mean() > 0.97
        assert diff.max() <= 128
        # counts: every caption names every category with its count, and nothing else
        counts: dict[str, int] = {}
        for a in anns[im["id"]]:
            counts[name_of[a["category_id"]]] = counts.get(name_of[a["category_id"]], 0) + 1
        for c in (c["caption"] for c in caps["annotations"] if c["image_id"] == im["id"]):
            for name in COCO_CATEGORIES:
                n = counts.get(name, 0)
                colors = "|".join(PALETTE)
                if n == 1:
                    assert re.search(rf"\b(a|an) (({colors}) )?{name}\b(?!s)", c), (c, name)
                elif n > 1:
                    word = {2: "two", 3: "three"}[n]
                    assert re.search(rf"\b{word} (({colors}) )?{plural(name)}\b", c), (c, name)
                else:
                    assert not re.search(rf"\b({name}|{plural(name)})\b", c), (c, name)
    assert checked > 100


def test_captions_use_no_other_chair_word(world_dir):
    import veridical.evals

    synonyms_file = Path(veridical.evals.__file__).with_name("chair_synonyms.txt")
    if not synonyms_file.exists():
        pytest.skip("CHAIR synonym table not present")
    words = set()
    for line in synonyms_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            words.update(w.strip() for w in line.split(","))
    out, _ = world_dir
    caps = json.loads((out / "annotations" / "captions_train.json").read_text())
    names = sorted([*COCO_CATEGORIES, *(plural(n) for n in COCO_CATEGORIES)], key=len, reverse=True)
    for c in caps["annotations"]:
        text = c["caption"]
        for n in names:
            text = re.sub(rf"\b{n}\b", " ", text)
        for w in text.split():
            assert w not in words and w.rstrip("s") not in words, (w, c["caption"])


def test_chair_pipeline_sees_every_category_name():
    chair = pytest.importorskip("veridical.evals.chair")
    from veridical.world.text import with_article

    vocab = chair.load_vocabulary()
    for name in COCO_CATEGORIES:  # e.g. "bus" would vanish: pattern's singular of it is "bu"
        for text in (f"there is {with_article(name)} .", f"there are two {plural(name)} ."):
            found = [cat for _, cat in chair.caption_words(text, vocab).mentions]
            assert found == [name], (text, found)


def test_pope_files_valid(world_dir):
    pytest.importorskip("veridical.evals.pope")
    out, manifest = world_dir
    inst = json.loads((out / "annotations" / "instances_test.json").read_text())
    name_of = {c["id"]: c["name"] for c in inst["categories"]}
    file_of = {im["id"]: im["file_name"] for im in inst["images"]}
    present: dict[str, set[str]] = {}
    for a in inst["annotations"]:
        present.setdefault(file_of[a["image_id"]], set()).add(name_of[a["category_id"]])
    n_images = manifest["pope"]["splits"]["test"]["images"]
    assert n_images == 20
    for split in ("random", "popular", "adversarial"):
        lines = (out / "pope" / "test" / f"coco_pope_{split}.json").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        assert len(recs) == 6 * n_images
        assert sum(r["label"] == "yes" for r in recs) == 3 * n_images
        per_image: dict[str, int] = {}
        for r in recs:
            per_image[r["image"]] = per_image.get(r["image"], 0) + 1
            obj = re.fullmatch(r"Is there an? (.+) in the image\?", r["text"]).group(1)
            assert (obj in present[r["image"]]) == (r["label"] == "yes")
        assert set(per_image.values()) == {6}
    blind = manifest["pope"]["splits"]["test"]["blind_scene_baseline"]
    assert blind["adversarial"]["accuracy"] < blind["random"]["accuracy"]


def test_blind_scene_answers_follow_scene_only():
    world = build_world(WorldConfig())
    instances = {"images": [{"file_name": "a.png", "scene": "kitchen"}]}
    qs = [{"question_id": 1, "image": "a.png", "text": "Is there a wine glass in the image?"},
          {"question_id": 2, "image": "a.png", "text": "Is there an umbrella in the image?"}]
    assert synthcoco.blind_scene_answers(qs, instances, world) == ["yes", "no"]
    with pytest.raises(ValueError, match="names no category"):
        synthcoco.blind_scene_answers([{**qs[0], "text": "Is there a dog in the image?"}],
                                      instances, world)


def test_mme_folders_valid_and_true(world_dir):
    out, manifest = world_dir
    inst = json.loads((out / "annotations" / "instances_test.json").read_text())
    name_of = {c["id"]: c["name"] for c in inst["categories"]}
    by_file = {im["file_name"]: im["id"] for im in inst["images"]}
    anns: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for task in MME_TASKS:
        folder = out / "mme" / task
        txts = sorted(folder.glob("*.txt"))
        assert len(txts) == manifest["mme"]["images_per_task"][task] == 6
        assert len(list(folder.glob("*.png"))) == 6
        for txt in txts:
            img = txt.with_suffix(".png")
            assert img.read_bytes() == (out / "images" / "test" / img.name).read_bytes()
            lines = txt.read_text().split("\n")
            assert len(lines) == 2
            pairs = [line.split("\t") for line in lines]
            assert [a for _, a in pairs] == ["Yes", "No"]
            assert all(q.endswith(MME_SUFFIX) for q, _ in pairs)
            objs = [(name_of[a["category_id"]], a["color"]) for a in anns[by_file[img.name]]]
            names = {n for n, _ in objs}
            for q, answer in pairs:
                q = q[: -len(MME_SUFFIX)]
                if task == "existence":
                    obj = re.fullmatch(r"Is there an? (.+) in this image\?", q).group(1)
                    assert (obj in names) == (answer == "Yes")
                elif task == "color":
                    col, obj = re.fullmatch(r"Is there an? (\w+) (.+) in this image\?", q).groups()
                    assert ((obj, col) in objs) == (answer == "Yes")
                elif task == "count":
                    m = re.fullmatch(r"Is there only one (.+) in this image\?", q)
                    if m:
                        obj, k = m.group(1), 1
                    else:
                        word, rest = re.fullmatch(r"Are there (\w+) (.+) in this image\?", q).groups()
                        k = {"two": 2, "three": 3, "four": 4}[word]
                        obj = next(n for n in names if plural(n) == rest)
                    assert (sum(n == obj for n, _ in objs) == k) == (answer == "Yes")
                else:
                    obj = re.fullmatch(r"Is the (.+) (?:on|at) the (?:left|right|top|bottom)"
                                       r"(?: side)? of this image\?", q).group(1)
                    assert sum(n == obj for n, _ in objs) == 1


def test_cooccurrence_statistics_follow_config():
    config = WorldConfig()
    world = build_world(config)

    def stats(cfg: WorldConfig, n: int = 400) -> dict:
        images, anns = [], []
        for i in range(n):
            layout = sample_layout(world, cfg, image_rng(11, 3, i))
            images.append({"id": i, "scene": layout.scene})
            anns += [{"image_id": i, "category_id": world.category(o.category).coco_id}
                     for o in layout.objects]
        inst = {"images": images, "annotations": anns,
                "categories": [{"id": c.coco_id, "name": c.name} for c in world.categories]}
        return synthcoco.cooccurrence_stats(inst, world)

    s = stats(config)
    assert 0.78 <= s["p_partner_given_present"] <= 0.95
    assert 0.2 <= s["p_same_scene_nonpartner_given_present"] <= 0.5
    assert s["p_other_scene_given_present"] <= 0.03
    assert 0.04 <= s["images_with_out_of_scene"] <= 0.13
    assert 2.5 <= s["categories_per_image"] <= 4.0
    weak = stats(dataclasses.replace(config, partner_prob=0.2, out_of_scene_prob=0.4))
    assert weak["p_partner_given_present"] < s["p_partner_given_present"] - 0.3
    assert weak["images_with_out_of_scene"] > 0.3


def test_world_seed_redraws_partners_only():
    curated = build_world(WorldConfig())
    assert ("fork", "knife") in curated.pairs and ("traffic light", "stop sign") in curated.pairs
    assert ("car", "truck") in curated.pairs and ("couch", "tv") in curated.pairs
    curated_pairs = {frozenset(p) for p in curated.pairs}
    seen = set()
    for ws in range(1, 6):
        w = build_world(WorldConfig(world_seed=ws))
        assert w == build_world(WorldConfig(world_seed=ws))
        assert w.categories == curated.categories and w.scenes == curated.scenes
        assert not curated_pairs & {frozenset(p) for p in w.pairs}
        for a, b in w.pairs:
            assert w.category(a).scene == w.category(b).scene
        assert sorted(x for p in w.pairs for x in p) == sorted(c.name for c in w.categories)
        seen.add(w.pairs)
    assert len(seen) > 1


def test_glyphs_distinct_and_partners_share_no_look():
    def mask(name: str) -> np.ndarray:
        w, h = glyph_dims(name, 32)
        m = glyph_coverage(name, w, h) >= 0.5
        c = np.zeros((34, 34), dtype=bool)
        c[(34 - h) // 2:(34 - h) // 2 + h, (34 - w) // 2:(34 - w) // 2 + w] = m
        return c

    def variants(name: str):
        w, h = glyph_dims(name, 32)
        m = glyph_coverage(name, w, h) >= 0.5
        for k in range(4):
            for t in (np.rot90(m, k), np.rot90(m, k)[:, ::-1]):
                c = np.zeros((34, 34), dtype=bool)
                th, tw = t.shape
                c[(34 - th) // 2:(34 - th) // 2 + th, (34 - tw) // 2:(34 - tw) // 2 + tw] = t
                yield c

    names = list(GLYPHS)
    assert sorted(names) == sorted(COCO_CATEGORIES)
    for i, a in enumerate(names):
        ma = mask(a)
        for b in names[i + 1:]:
            iou = max((ma & v).sum() / (ma | v).sum() for v in variants(b))
            assert iou < 0.85, (a, b, iou)
    world = build_world(WorldConfig())
    for scene in world.scenes:
        colors = [world.category(c).color for c in scene.categories]
        assert len(set(colors)) == len(colors), scene.name  # so any pairing differs in colour
    for bands, _ in SCENES.values():
        for band in bands[:2]:
            for rgb in PALETTE.values():
                assert np.linalg.norm(np.subtract(rgb, band)) > 85


def test_glyphs_readable_at_smallest_size():
    for name in GLYPHS:
        w, h = glyph_dims(name, 8)
        cov = glyph_coverage(name, w, h)
        assert (cov >= 0.5).sum() >= 10, name


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("partner_prob", 1.5, "partner_prob=1.5"),
    ("size_max", 40, "size_max=40"),
    ("count_weights", (0.5, 0.2), "count_weights=(0.5, 0.2)"),
    ("image_size", 16, "image_size=16"),
])
def test_config_errors_name_field_value_and_fix(field, value, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        WorldConfig(**{field: value})
    assert "use" in str(info.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        generate_world(tmp_path / "a", QUICK, 0, {})
    with pytest.raises(ValueError, match="seed=-1"):
        generate_world(tmp_path / "a", QUICK, -1, {"test": 2})
    with pytest.raises(ValueError, match="split name"):
        generate_world(tmp_path / "a", QUICK, 0, {"te st": 2})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_world(foreign, QUICK, 0, {"test": 2})
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_world_generate(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="veridical")
    sub = parser.add_subparsers(dest="command", required=True)
    synthcoco.add_subcommands(sub)
    out = tmp_path / "w"
    flags = ("--train 0 --val 0 --test 8 --world-seed 2 --noise-sigma 0 --count-weights 1 "
             "--mme-images-per-task 2 --quiet").split()
    args = parser.parse_args(["world", "generate", "--seed", "4", "--out", str(out), *flags])
    assert args.func(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["world_seed"] == 2 and manifest["config"]["noise_sigma"] == 0.0
    assert manifest["config"]["count_weights"] == [1.0]
    assert manifest["splits"] == {"test": 8}
    assert "wrote SynthCOCO world" in capsys.readouterr().out
    # regenerating into a previous world's folder replaces it
    flags = "--train 0 --val 0 --test 3 --quiet".split()
    args = parser.parse_args(["world", "generate", "--seed", "4", "--out", str(out), *flags])
    assert args.func(args) == 0
    assert len(list((out / "images" / "test").iterdir())) == 3


def test_builtin_world_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    import subprocess
    import sys

    import veridical.world as world
    from veridical.errors import InputError

    monkeypatch.setenv("VERIDICAL_CACHE", str(tmp_path))
    monkeypatch.setattr(synthcoco, "BUILTIN_SPLITS", {"test": 3})
    folder = world.builtin_world("test")
    assert folder.parent == tmp_path and (folder / "manifest.json").is_file()
    assert len(list((folder / "images" / "test").glob("*.png"))) == 3
    monkeypatch.setattr(synthcoco, "generate_world", lambda *a, **k: 1 / 0)
    assert world.builtin_world("test") == folder  # reused, not regenerated
    with pytest.raises(InputError, match="not a split of builtin:synthcoco"):
        world.builtin_world("dev")
    # the world is reachable without the evaluation harness
    code = ("import sys, veridical.world; "
            "print(sorted(m for m in sys.modules if m.startswith('veridical.evals')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
