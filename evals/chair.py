"""CHAIR (Rohrbach et al. 2018): object hallucination in captions, fully offline.

References: LisaAnne/Hallucination ``utils/chair.py`` + ``data/synonyms.txt`` (the original,
Python 2, pattern's ``singularize``) and its Python 3 port shikiw/OPERA ``chair.py`` (nltk POS
tags + WordNet lemmatizer, adds recall and length). No tokenizer, tagger or WordNet data is
downloaded: tokenization uses nltk's Treebank-style ``NLTKWordTokenizer`` (pure code) after an
untrained Punkt sentence splitter, and singular forms come from the ``inflect`` package.

Word pipeline (per caption, generated or human)
    1. lowercase; split sentences, tokenize (what ``nltk.word_tokenize`` does);
    2. singular form of every token (``singularizer``, below);
    3. left to right, a pair of tokens in the two-word table becomes one word: the 29 COCO
       double words (``DOUBLE_WORDS``, duplicates included, e.g. 'traffic light', 'teddy bear',
       'train track'), 'baby|adult <animal>' -> animal, 'passenger jet|train' -> jet|train,
       'bow tie' -> 'tie', 'toilet seat' -> 'toilet', 'wine glas' -> 'wine glass';
    4. if 'toilet' is among the words, every 'seat' is dropped;
    5. words found in the synonym table are object mentions, mapped to their category (the first
       word of their line in ``chair_synonyms.txt``); repeats count.

Ground truth of an image = the categories of its COCO instance annotations UNION the objects
found (same pipeline) in all its human captions, from ``instances_{split}.json`` and
``captions_{split}.json`` of val2014 and train2014, read with pycocotools.

Metrics
    chair_s = captions with >= 1 hallucinated mention / captions; chair_i = hallucinated
    mentions / all mentions; recall = sum over captions of |distinct mentioned categories in
    the ground truth| / sum of |ground truth|; length = mean number of words per caption after
    step 3 (punctuation tokens included, as OPERA counts). Fractions in [0, 1], not percents.
    Per caption: the mentions, the hallucinated (word, category) pairs, the covered categories.

Reproduced quirks (documented, each with its switch)
    * Double space: the synonym lines "motorcycle, scooter,  motor bike, ..." and
      "cake,  cheesecake, ..." have two spaces after a comma. The references split lines on
      ", ", so the entries are " motor bike" and " cheesecake" (leading space) and never match:
      "motor bike" and "cheesecake" are not counted. Reproduced by default;
      ``double_space_quirk=False`` (CLI ``--no-double-space-quirk``) splits on "," and strips,
      so both count (as motorcycle and cake).
    * 'stove top oven' is in the double-word list but only pairs are ever merged, so it never
      matches ("stove top oven" counts two ovens). 'iPhone' in the table is capitalised and
      never matches lowercased text. Both kept.

Singular forms (``singularizer=``; the name is recorded with every score)
    ``pattern`` (default): ``inflect``'s ``singular_noun`` on every token, plus a table of the
    nine words where pattern's ``singularize`` (the original) gives a different object outcome:
    canoes->cano, collies->collies, doggies->doggies, magpies->magpy, thieves->thieve, ties->ty
    (all missed by the original), grandchildren->grandchild, oxens, skiss. Checked against
    pattern's rules on the 69k words of lemminflect's lexicon and on every synonym's plural
    forms: the same object category (or none) and the same two-word merges for every one. Like pattern, singular 'bus',
    'minibus' and 'airbus' lose their 's' ('bu') and are not counted; 'buses' is.
    ``wordnet-noun``: ``inflect`` with the noun lemmas WordNet gives (OPERA): 'bus', 'minibus'
    and 'airbus' stay whole, 'busses' -> 'bus', 'grandchildren' -> 'grandchild'. OPERA lemmatizes with
    POS tags, so it also turns words its tagger calls verbs/adjectives into lemmas ('skiing'
    -> 'ski' = skis, 'seated' -> 'seat' = chair, 'potted plant' -> 'pot plant', 'sports ball'
    -> 'sport ball'); that needs the tagger's data and is not reproduced: this variant is
    OPERA on nouns only. ``inflect``: ``singular_noun`` alone, no table.
    ``inflect`` was chosen over ``lemminflect`` because it is closer to both references: on the
    vocabulary it differs from pattern on 9 words (above), lemminflect on 25, some of them
    wrong for both references ('corgi' -> 'corgus').

Tokenizer: the references call ``nltk.word_tokenize``, whose sentence splitter is Punkt's
pretrained English model (a data download). The untrained Punkt used here also ends a sentence
at a period followed by a space, but does not know abbreviations: "mr. smith" gives 'mr', '.'
where the pretrained model keeps 'mr.'. Only the length can change (+1 per abbreviation).

Captions file: JSON lines (or one JSON array) of ``{"image_id": 42, "caption": "..."}``, the
OPERA output format; ``image_id`` an integer (or digit string). Each image at most once.

Bad data raises ``InputError`` (a ``ValueError``) naming the file, the line and the fix;
``skip_bad_lines=True`` skips malformed lines and captions of images missing from the
annotations instead, and counts them.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

from veridical.errors import InputError

from .pope import BadRecord, Loaded, read_records

SYNONYMS_FILE = Path(__file__).with_name("chair_synonyms.txt")

# The reference's two-word table, in its order, duplicates included (29 entries).
DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "hot dog", "teddy bear", "home plate", "train track",
)
# 'baby X' / 'adult X' -> X, so that 'baby' / 'adult' do not fire 'person'.
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                "giraffe", "animal", "cub")
# 'passenger X' -> X, so that 'passenger' does not fire 'person'.
VEHICLE_WORDS = ("jet", "train")

METRICS = ("chair_s", "chair_i", "recall", "length")
HIGHER_IS_BETTER = {"chair_s": False, "chair_i": False, "recall": True, "length": None}
DEFAULT_SPLITS = ("val2014", "train2014")

# Words where pattern.singularize and inflect.singular_noun lead to a different object outcome.
PATTERN_OVERRIDES = {
    "canoes": "cano", "collies": "collies", "doggies": "doggies", "grandchildren": "grandchild",
    "magpies": "magpy", "oxens": "oxs", "skiss": "skis", "thieves": "thieve", "ties": "ty",
}
# Nouns where WordNet's lemma (OPERA) differs from inflect.singular_noun in object outcome.
WORDNET_NOUN_OVERRIDES = {
    "bus": "bus", "minibus": "minibus", "airbus": "airbus", "busses": "bus",
    "minibusses": "minibus", "grandchildren": "grandchild",
}


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The synonym table (word -> category), the 80 categories and the two-word table."""

    to_category: Mapping[str, str]
    categories: tuple[str, ...]
    double_words: Mapping[str, str]
    double_space_quirk: bool
    sha256: str


def parse_synonym_lines(lines: Iterable[str], *, double_space_quirk: bool = True) -> list[list[str]]:
    """Synonym lines -> ``[[category, synonym, ...], ...]``; '#' lines and blank lines skipped.

    With the quirk (reference behaviour) a line is stripped and split on ", ", so a double
    space leaves a leading space in the entry; without it the line is split on "," and each
    entry stripped.
    """
    rows = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if double_space_quirk:
            rows.append(line.strip().split(", "))
        else:
            rows.append([w.strip() for w in line.split(",") if w.strip()])
    return rows


def double_word_table() -> dict[str, str]:
    """The reference's two-word table: phrase -> the word it is treated as."""
    table = {w: w for w in DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # pattern singularizes 'glass' to 'glas'
    return table


@functools.lru_cache(maxsize=8)
def load_vocabulary(path: str | None = None, *, double_space_quirk: bool = True) -> Vocabulary:
    """The synonym table at ``path`` (default: the reference table shipped here)."""
    p = Path(path) if path is not None else SYNONYMS_FILE
    if not p.is_file():
        raise InputError(f"synonym table {str(p)!r} does not exist; omit it to use the shipped table")
    raw = p.read_bytes()
    rows = parse_synonym_lines(raw.decode("utf-8").splitlines(),
                               double_space_quirk=double_space_quirk)
    to_category: dict[str, str] = {}
    for row in rows:
        for word in row:
            to_category[word] = row[0]  # later lines win, as in the reference's dict
    # Read-only views: the vocabulary is cached and shared.
    return Vocabulary(
        to_category=MappingProxyType(to_category),
        categories=tuple(row[0] for row in rows),
        double_words=MappingProxyType(double_word_table()),
        double_space_quirk=double_space_quirk,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


# --------------------------------------------------------------------------- words


@functools.cache
def _tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    # Untrained Punkt: no data file; see the module docstring for how it differs.
    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` without its data download: sentences, then Treebank tokens."""
    sentences, words = _tokenizers()
    return [tok for sent in sentences.tokenize(text) for tok in words.tokenize(sent)]


@functools.cache
def _inflect_engine():
    import inflect

    return inflect.engine()


@functools.lru_cache(maxsize=200_000)
def inflect_singular(word: str) -> str:
    """``inflect``'s singular of ``word``, or ``word`` itself when it is not a plural noun."""
    if not word:
        return word
    try:
        out = _inflect_engine().singular_noun(word)
    except Exception:  # inflect's type checks reject some tokens; those are not nouns anyway
        return word
    return out if out else word


_SINGULARIZERS: dict[str, Callable[[str], str]] = {
    "pattern": lambda w: PATTERN_OVERRIDES.get(w) or inflect_singular(w),
    "wordnet-noun": lambda w: WORDNET_NOUN_OVERRIDES.get(w) or inflect_singular(w),
    "inflect": inflect_singular,
}


def available_singularizers() -> list[str]:
    return list(_SINGULARIZERS)


def get_singularizer(name: str) -> Callable[[str], str]:
    """The singular-form function registered as ``name``; unknown names get a did-you-mean."""
    if name in _SINGULARIZERS:
        return _SINGULARIZERS[name]
    close = difflib.get_close_matches(str(name).lower(), list(_SINGULARIZERS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InputError(f"unknown CHAIR singularizer {name!r}; {hint}available: "
                     f"{', '.join(_SINGULARIZERS)}")


def merge_double_words(words: Sequence[str], table: Mapping[str, str]) -> list[str]:
    """Left to right, replace a pair found in ``table`` by its value (step 3)."""
    out, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if i + 1 < len(words) and pair in table:
            out.append(table[pair])
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


@dataclass(frozen=True)
class CaptionWords:
    """A caption after the word pipeline: its words and its object mentions, in order."""

    words: tuple[str, ...]  # after singularization and merging; ``len`` is the caption length
    mentions: tuple[tuple[str, str], ...]  # (word, category), repeats kept

    @property
    def categories(self) -> list[str]:
        return [c for _, c in self.mentions]


def caption_words(caption: str, vocab: Vocabulary | None = None,
                  singularizer: str = "pattern") -> CaptionWords:
    """Run the word pipeline (module docstring, steps 1-5) on one caption."""
    vocab = vocab or load_vocabulary()
    sing = get_singularizer(singularizer)
    words = merge_double_words([sing(t) for t in tokenize(caption.lower())], vocab.double_words)
    kept = [w for w in words if w != "seat"] if "toilet" in words else words
    mentions = tuple((w, vocab.to_category[w]) for w in kept if w in vocab.to_category)
    return CaptionWords(words=tuple(words), mentions=mentions)


def drop_incomplete_sentence(caption: str) -> str:
    """Keep the text up to and including its last '.', as OPERA's maintainers do at 64 tokens.

    A caption without any '.' becomes empty (that reference line: ``cap[:cap.rfind('.') + 1]``).
    """
    return caption[:caption.rfind(".") + 1]


# --------------------------------------------------------------------------- scoring


def score_caption(caption: str, gt_objects: Iterable[str], *, vocab: Vocabulary | None = None,
                  singularizer: str = "pattern") -> dict[str, Any]:
    """Per caption: mentions, hallucinated and covered objects, and its own CHAIR values."""
    gt = set(gt_objects)
    cw = caption_words(caption, vocab, singularizer)
    hallucinated = [[w, c] for w, c in cw.mentions if c not in gt]
    covered = sorted({c for _, c in cw.mentions if c in gt})
    return {
        "caption": caption,
        "words": len(cw.words),
        "mentions": [[w, c] for w, c in cw.mentions],
        "hallucinated": hallucinated,
        "covered": covered,
        "gt_objects": sorted(gt),
        "chair_s": int(bool(hallucinated)),
        "chair_i": len(hallucinated) / len(cw.mentions) if cw.mentions else 0.0,
        "recall": len(covered) / len(gt) if gt else 0.0,
    }


def aggregate(per_caption: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """CHAIR_s, CHAIR_i, recall, length (+ counts) over per-caption results."""
    n = len(per_caption)
    mentions = sum(len(c["mentions"]) for c in per_caption)
    hallucinated = sum(len(c["hallucinated"]) for c in per_caption)
    gt = sum(len(c["gt_objects"]) for c in per_caption)
    covered = sum(len(c["covered"]) for c in per_caption)
    return {
        "chair_s": sum(c["chair_s"] for c in per_caption) / n if n else 0.0,
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": covered / gt if gt else 0.0,
        "length": sum(c["words"] for c in per_caption) / n if n else 0.0,
        "captions": n,
        "mentions": mentions,
        "hallucinated": hallucinated,
    }


def score(captions: Loaded | Sequence[Mapping[str, Any]], ground_truth: Mapping[int, Iterable[str]],
          *, vocab: Vocabulary | None = None, singularizer: str = "pattern",
          drop_incomplete: bool = False) -> dict[str, Any]:
    """Score ``[{"image_id", "caption"}]`` against ``{image_id: categories}``.

    Returns ``{"metrics": ..., "captions": [per caption], "settings": ...}``.
    """
    vocab = vocab or load_vocabulary()
    get_singularizer(singularizer)
    recs = captions.records if isinstance(captions, Loaded) else list(captions)
    per = []
    for i, rec in enumerate(recs):
        image_id = rec["image_id"]
        if image_id not in ground_truth:
            where = captions.where(i) if isinstance(captions, Loaded) else f"caption {i + 1}"
            raise InputError(f"{where}: image_id {image_id!r} has no ground truth; is it a COCO "
                             "2014 image present in the annotation files?")
        text = drop_incomplete_sentence(rec["caption"]) if drop_incomplete else rec["caption"]
        item = score_caption(text, ground_truth[image_id], vocab=vocab, singularizer=singularizer)
        per.append({"image_id": image_id, **item})
    return {"metrics": aggregate(per), "captions": per,
            "settings": settings(vocab, singularizer, drop_incomplete)}


def settings(vocab: Vocabulary, singularizer: str, drop_incomplete: bool) -> dict[str, Any]:
    """What a CHAIR number depends on besides the data (recorded with every score)."""

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "singularizer": singularizer,
        "double_space_quirk": vocab.double_space_quirk,
        "drop_incomplete_sentence": drop_incomplete,
        "synonyms_sha256": vocab.sha256,
        "tokenizer": "nltk NLTKWordTokenizer + untrained PunktSentenceTokenizer",
        "nltk": version("nltk"),
        "inflect": version("inflect"),
    }


# --------------------------------------------------------------------------- captions and images


def _validate_caption(image_id_key: str, caption_key: str) -> Callable[[dict], dict]:
    def validate(obj: dict) -> dict:
        for key in (image_id_key, caption_key):
            if key not in obj:
                raise BadRecord(f"missing key {key!r} (keys present: {sorted(obj)})")
        image_id = obj[image_id_key]
        if isinstance(image_id, str) and image_id.strip().isdigit():
            image_id = int(image_id)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise BadRecord(f"{image_id_key!r} must be a COCO image id (an integer), got {image_id!r}")
        if not isinstance(obj[caption_key], str):
            raise BadRecord(f"{caption_key!r} must be a string, got {type(obj[caption_key]).__name__}")
        return {**obj, "image_id": image_id, "caption": obj[caption_key]}

    return validate


def load_captions(path: str | Path, *, image_id_key: str = "image_id", caption_key: str = "caption",
                  skip_bad_lines: bool = False) -> Loaded:
    """Captions file (JSON lines or array of ``{"image_id", "caption"}``) -> ``Loaded``."""
    loaded = read_records(path, _validate_caption(image_id_key, caption_key), what="captions",
                          skip_bad_lines=skip_bad_lines)
    seen: dict[int, int] = {}
    for i, rec in enumerate(loaded.records):
        if rec["image_id"] in seen:
            raise InputError(f"{loaded.where(i)}: image_id {rec['image_id']} already has a caption "
                             f"at {loaded.locations[seen[rec['image_id']]]}; keep one caption per "
                             "image (did two runs append to the same file?)")
        seen[rec["image_id"]] = i
    return loaded


def read_image_ids(path: str | Path) -> list[int]:
    """An image id list: a JSON array of ints, or one id per line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image id list {str(p)!r} does not exist; check the path")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        bad = [x for x in ids if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise InputError(f"{p}: image ids must be integers, got {bad[:3]}")
        return list(ids)
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not line.strip().isdigit():
                raise InputError(f"{p}, line {lineno}: {line.strip()!r} is not an integer image id")
            out.append(int(line.strip()))
    return out


def select_image_ids(available: Iterable[int], num_images: int = 500, seed: int = 0,
                     ids: Sequence[int] | None = None) -> list[int]:
    """The images to caption: ``ids`` when given (checked against ``available``), else
    ``num_images`` of the sorted ``available`` ids shuffled with ``random.Random(seed)``."""
    pool = sorted(set(available))
    if ids is not None:
        known = set(pool)
        missing = [i for i in ids if i not in known]
        if missing:
            raise InputError(f"{len(missing)} requested image ids are not in the annotations "
                             f"(first: {missing[:5]}); check the id list and the annotation split")
        return list(ids)
    if not isinstance(num_images, int) or not 1 <= num_images <= len(pool):
        raise InputError(f"num_images must be between 1 and {len(pool)} (the images available), "
                         f"got {num_images!r}")
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool[:num_images]


# --------------------------------------------------------------------------- ground truth


def _coco(data: Any, what: str):
    from pycocotools.coco import COCO

    if isinstance(data, COCO):
        return data
    coco = COCO()
    if isinstance(data, (str, Path)):
        p = Path(data)
        if not p.is_file():
            raise InputError(f"COCO {what} file {str(p)!r} does not exist; check --annotations")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(str(p))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{p}: not a COCO {what} file ({exc!r})") from None
    if not isinstance(data, Mapping) or "annotations" not in data or "images" not in data:
        raise InputError(f"COCO {what} must be a path, a pycocotools COCO or a dict with 'images' "
                         f"and 'annotations', got {type(data).__name__}")
    coco.dataset = dict(data)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise InputError(f"COCO {what} dict is not in COCO layout ({exc!r})") from None
    return coco


def ground_truth_from_coco(instances: Any, captions: Any, image_ids: Iterable[int], *,
                           vocab: Vocabulary | None = None,
                           singularizer: str = "pattern") -> dict[int, set[str]]:
    """``{image_id: categories}`` for the ids present in this instances + captions pair."""
    vocab = vocab or load_vocabulary()
    inst, caps = _coco(instances, "instances"), _coco(captions, "captions")
    out: dict[int, set[str]] = {}
    for image_id in image_ids:
        if image_id not in inst.imgs and image_id not in caps.imgs:
            continue
        objects: set[str] = set()
        for ann in inst.imgToAnns.get(image_id, []):
            cat = inst.cats.get(ann["category_id"])
            if cat is None or cat["name"] not in vocab.to_category:
                name = cat["name"] if cat else ann["category_id"]
                raise InputError(f"instance annotation {ann.get('id')!r} has category {name!r}, "
                                 "which is not in the CHAIR synonym table (COCO's 80 categories)")
            objects.add(vocab.to_category[cat["name"]])
        for ann in caps.imgToAnns.get(image_id, []):
            objects.update(caption_words(ann["caption"], vocab, singularizer).categories)
        out[image_id] = objects
    return out


def annotation_files(directory: str | Path,
                     splits: Sequence[str] = DEFAULT_SPLITS) -> list[tuple[Path, Path]]:
    """``[(instances_S.json, captions_S.json)]`` for each split S present in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"annotations folder {str(d)!r} does not exist; point it at the folder "
                         "with instances_val2014.json and captions_val2014.json")
    pairs = []
    for split in splits:
        inst, caps = d / f"instances_{split}.json", d / f"captions_{split}.json"
        if inst.is_file() != caps.is_file():
            have, lack = (inst, caps) if inst.is_file() else (caps, inst)
            raise InputError(f"{d}: found {have.name} but not {lack.name}; CHAIR's ground truth "
                             "needs both instances and captions of a split")
        if inst.is_file():
            pairs.append((inst, caps))
    if not pairs:
        names = sorted(p.name for p in d.glob("*.json"))[:10]
        raise InputError(f"{d} has none of {[f'instances_{s}.json' for s in splits]} (with their "
                         f"captions_*.json); found {names}. Unpack COCO's annotations_trainval2014 there")
    return pairs


def load_ground_truth(directory: str | Path, image_ids: Iterable[int], *,
                      vocab: Vocabulary | None = None, singularizer: str = "pattern",
                      splits: Sequence[str] = DEFAULT_SPLITS) -> tuple[dict[int, set[str]], list[str]]:
    """Ground truth of ``image_ids`` from a COCO annotations folder -> ``(gt, files read)``.

    Splits are read in order and reading stops once every id is found (2014 train and val ids
    are disjoint, so this equals reading all). Ids found nowhere are absent from ``gt``.
    """
    remaining = set(image_ids)
    gt: dict[int, set[str]] = {}
    used: list[str] = []
    for inst, caps in annotation_files(directory, splits):
        if not remaining:
            break
        found = ground_truth_from_coco(inst, caps, sorted(remaining), vocab=vocab,
                                       singularizer=singularizer)
        used += [str(inst), str(caps)]
        gt.update(found)
        remaining -= found.keys()
    return gt, used


def score_files(captions_path: str | Path, annotations_dir: str | Path, *,
                image_ids: Sequence[int] | None = None, singularizer: str = "pattern",
                double_space_quirk: bool = True, drop_incomplete: bool = False,
                skip_bad_lines: bool = False, synonyms: str | None = None) -> dict[str, Any]:
    """Score a captions file against a COCO annotations folder.

    ``image_ids`` (e.g. the released 500 ids) restricts scoring to those images and requires a
    caption for each. Captions of images missing from the annotations raise, or with
    ``skip_bad_lines`` are skipped and counted in ``missing_images``.
    """
    get_singularizer(singularizer)
    vocab = load_vocabulary(synonyms, double_space_quirk=double_space_quirk)
    caps = load_captions(captions_path, skip_bad_lines=skip_bad_lines)
    if image_ids is not None:
        wanted = set(image_ids)
        have = {r["image_id"] for r in caps.records}
        lacking = [i for i in image_ids if i not in have]
        if lacking:
            raise InputError(f"{caps.path} has no caption for {len(lacking)} of the requested "
                             f"images (first: {lacking[:5]}); caption them or drop them from the list")
        keep = [i for i, r in enumerate(caps.records) if r["image_id"] in wanted]
        caps = Loaded(records=[caps.records[i] for i in keep], path=caps.path,
                      locations=[caps.locations[i] for i in keep], skipped=caps.skipped,
                      problems=caps.problems)
    gt, used = load_ground_truth(annotations_dir, [r["image_id"] for r in caps.records],
                                 vocab=vocab, singularizer=singularizer)
    missing = [i for i, r in enumerate(caps.records) if r["image_id"] not in gt]
    if missing and not skip_bad_lines:
        i = missing[0]
        raise InputError(f"{caps.where(i)}: image_id {caps.records[i]['image_id']} is in none of "
                         f"{[Path(u).name for u in used] or 'the annotation files'} ({len(missing)} "
                         "such captions); add the annotation split that has it, fix the id, or pass "
                         "skip_bad_lines=True (CLI: --skip-bad-lines) to skip and count them")
    problems = list(caps.problems) + [f"{caps.where(i)}: image_id {caps.records[i]['image_id']} "
                                      "not in the annotations" for i in missing]
    drop = set(missing)
    caps = Loaded(records=[r for i, r in enumerate(caps.records) if i not in drop], path=caps.path,
                  locations=[loc for i, loc in enumerate(caps.locations) if i not in drop],
                  skipped=caps.skipped, problems=problems)
    out = score(caps, gt, vocab=vocab, singularizer=singularizer, drop_incomplete=drop_incomplete)
    out.update(captions_file=str(captions_path), annotation_files=used,
               skipped_lines=caps.skipped, missing_images=len(missing), problems=problems)
    return out
