"""POPE: build, load and score yes/no object-probing questions exactly like AoiDragon/POPE.

References: AoiDragon/POPE ``main.py`` + ``utils.py`` (question sampling), ``evaluate.py``
(answer parsing and metrics); shikiw/OPERA ``pope_eval.py`` (the ``opera`` parser).

Question record (the official format; extra keys such as ``image_id`` or ``category`` are kept)::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"}

Question files
    JSON lines (the official ``coco_pope_*.json``, despite the extension) or one JSON array (the
    A-OKVQA / GQA files); the format is detected from the first character. Parquet files with the
    lmms-lab POPE columns (``question_id``, ``question``, ``answer``, ``image_source``,
    ``category``, ``image``) load through ``datasets`` from local files only.

Answer files
    JSON lines, one object per answer, the answer text under ``"text"`` (LLaVA's ``model_vqa``
    output, this package's runner) or ``"answer"`` (POPE's README). When every line has a
    ``"question_id"`` answers are matched to questions by id; when no line has one they are
    matched by line order, as ``evaluate.py`` does. Anything in between is an error.

Splits
    A question's split is its ``"category"`` or ``"split"`` field (LLaVA's combined question
    file, the lmms-lab parquet), else the word random / popular / adversarial in its file name,
    else the file's stem.

Parsers (by name, see ``available_parsers()``)
    ``pope`` (default, ``evaluate.py``): keep the text before the first ``.``, drop ``,``, split
    on single spaces; the answer is "no" if a word is exactly ``No``, ``not`` or ``no``, else
    "yes" (so "There isn't" and "NO" count as yes). ``opera`` (``pope_eval.py``): drop every
    ``.`` and ``,`` (no first-sentence cut), split on spaces; "no" if a word is ``No``, ``not``,
    ``no`` or ``NO`` or ends with ``n't``.

Metrics (yes is the positive class; per split, ``overall`` over all questions pooled, and
``mean`` = the unweighted mean over splits when there are several): accuracy, precision,
recall, f1 and yes_ratio = predicted yes / answered questions. Where the reference would divide
by zero (no predicted yes, no yes label) the value is 0.0.

Builder (``build_questions``): the images of a COCO instances file in their file order; an
image's objects are its distinct category names in the order their first annotation appears.
Images with at least ``per_image`` objects are kept and ``num_images`` of them drawn with
``random.Random(seed).sample``; per image, each of its first ``per_image`` objects is asked
("yes") and followed by one negative ("no") never in the image nor asked before for it:
random = a random object among the sampled images' objects; popular = the most frequent object
within the sampled images; adversarial = the object co-occurring most often with the current
positive within the sampled images; both fall back to random. The three splits are drawn in
the order random, popular, adversarial from ONE generator, so each split equals the file
``main.py`` writes when run after ``random.seed(seed)`` on the same objects. Question ids start
at 1 (``utils.py``). The template's article is fixed ("an apple"); the reference code wrote
"Is there an {} in the imange?" for vowels, a bug the released files do not have.

Bad data raises ``InputError`` (a ``ValueError``) naming the file, the line and the fix;
``skip_bad_lines=True`` (CLI ``--skip-bad-lines``) skips malformed lines instead and counts them.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veridical.errors import InputError

SPLITS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "Is there a {} in the image?"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
HIGHER_IS_BETTER = {"accuracy": True, "precision": True, "recall": True, "f1": True, "yes_ratio": None}
PARQUET_COLUMNS = ("question_id", "question", "answer", "image_source", "category")

_SKIP_HINT = "fix it, or pass skip_bad_lines=True (CLI: --skip-bad-lines) to skip and count bad lines"


# --------------------------------------------------------------------------- records and files


@dataclass
class Loaded:
    """Records read from one file, where each came from, and the bad lines skipped (if asked)."""

    records: list[dict]
    path: str
    locations: list[str] = field(default_factory=list)  # "line 7" / "item 3" / "row 12" per record
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # one message per skipped line
    source: Any = None  # parquet: the memory-mapped ``datasets.Dataset``, for ``image_bytes``

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def image_bytes(self, record: Mapping[str, Any]) -> bytes:
        """The encoded image of a record loaded from parquet (read on demand, not kept)."""
        if self.source is None or "row" not in record:
            raise InputError(f"{self.path}: record {record.get('question_id')!r} did not come from "
                             "a parquet file; open its image from the image folder instead")
        image = self.source[int(record["row"])]["image"]
        return image["bytes"] if isinstance(image, dict) else image

    def where(self, index: int) -> str:
        loc = self.locations[index] if index < len(self.locations) else f"record {index + 1}"
        return f"{self.path}, {loc}"


class BadRecord(ValueError):
    """Raised by a record validator; ``read_records`` adds the file and line."""


Validator = Callable[[dict], dict]


def _check_path(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {str(p)!r} does not exist or is not a file; check the path")
    return p


def read_records(path: str | Path, validate: Validator, *, what: str = "data",
                 skip_bad_lines: bool = False) -> Loaded:
    """Read a JSON-lines file or a JSON array of objects, validating each record.

    ``validate`` returns the normalized record or raises ``BadRecord``. A line that is not JSON,
    not an object, or fails validation raises ``InputError`` naming the file and line, unless
    ``skip_bad_lines``, which skips it and counts it in ``Loaded.skipped``.
    """
    p = _check_path(path, what)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not UTF-8 text ({exc}); save the {what} file as UTF-8") from None
    out = Loaded(records=[], path=str(p))

    def handle(loc: str, obj: Any) -> None:
        try:
            if not isinstance(obj, dict):
                raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
            rec = validate(obj)
        except BadRecord as exc:
            if not skip_bad_lines:
                raise InputError(f"{p}, {loc}: {exc}; {_SKIP_HINT}") from None
            out.skipped += 1
            out.problems.append(f"{p}, {loc}: {exc}")
            return
        out.records.append(rec)
        out.locations.append(loc)

    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            # A broken array cannot be split into records, so there is nothing to skip.
            raise InputError(f"{p}, line {exc.lineno}: invalid JSON array ({exc.msg}); fix the "
                             "file (a JSON array must parse as a whole)") from None
        for i, obj in enumerate(items, start=1):
            handle(f"item {i}", obj)
        return out
    # Split on "\n" only: str.splitlines would also break at U+2028 etc. inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if not skip_bad_lines:
                raise InputError(f"{p}, line {lineno}: invalid JSON ({exc.msg}); "
                                 f"{_SKIP_HINT}") from None
            out.skipped += 1
            out.problems.append(f"{p}, line {lineno}: invalid JSON ({exc.msg})")
            continue
        handle(f"line {lineno}", obj)
    return out


def _qid(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise BadRecord(f"question_id must be an integer or a non-empty string, got {value!r}")
    return value


def _label(value: Any, key: str = "label") -> str:
    if not isinstance(value, str) or value.strip().lower() not in ("yes", "no"):
        raise BadRecord(f"{key!r} must be 'yes' or 'no', got {value!r}")
    return value.strip().lower()


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise BadRecord(f"missing key {key!r} (keys present: {sorted(obj)})")
    if not isinstance(obj[key], str):
        raise BadRecord(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def validate_question(obj: dict) -> dict:
    """Check one question record; returns a copy with the label lowercased."""
    rec = dict(obj)
    if "question_id" not in obj:
        raise BadRecord(f"missing key 'question_id' (keys present: {sorted(obj)})")
    rec["question_id"] = _qid(obj["question_id"])
    _text(obj, "image")
    _text(obj, "text")
    if "label" not in obj:
        raise BadRecord(f"missing key 'label' (keys present: {sorted(obj)})")
    rec["label"] = _label(obj["label"])
    return rec


def validate_answer(obj: dict) -> dict:
    """Check one answer record: ``text`` (or ``answer``) string, optional ``question_id``."""
    key = "text" if "text" in obj else "answer" if "answer" in obj else None
    if key is None:
        raise BadRecord(f"no answer text: expected key 'text' or 'answer' (keys present: {sorted(obj)})")
    rec = dict(obj)
    rec["text"] = _text(obj, key)
    if "question_id" in obj:
        rec["question_id"] = _qid(obj["question_id"])
    return rec


def _check_unique_ids(loaded: Loaded, what: str) -> None:
    seen: dict[str, int] = {}
    for i, rec in enumerate(loaded.records):
        if "question_id" not in rec:
            continue
        key = str(rec["question_id"])
        if key in seen:
            raise InputError(f"{loaded.where(i)}: question_id {rec['question_id']!r} repeats "
                             f"{loaded.locations[seen[key]]}; each {what} needs a unique id "
                             "(did two runs append to the same file?)")
        seen[key] = i


def load_questions(path: str | Path, *, skip_bad_lines: bool = False) -> Loaded:
    """Official question file (JSON lines or JSON array) -> ``Loaded`` question records."""
    loaded = read_records(path, validate_question, what="POPE question",
                          skip_bad_lines=skip_bad_lines)
    _check_unique_ids(loaded, "question")
    return loaded


def load_answers(path: str | Path, *, skip_bad_lines: bool = False) -> Loaded:
    """Answer file (JSON lines with ``question_id`` + ``text``) -> ``Loaded`` answer records."""
    loaded = read_records(path, validate_answer, what="POPE answer", skip_bad_lines=skip_bad_lines)
    _check_unique_ids(loaded, "answer")
    return loaded


def parquet_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path().glob(str(path))) if any(c in str(path) for c in "*?[") else []
    if not files:
        raise InputError(f"no parquet file at {str(path)!r}; give a local .parquet file, a folder "
                         "holding them, or a glob (hub dataset names are not fetched)")
    return files


def load_parquet_questions(path: str | Path, *, split: str | None = None,
                           cache_dir: str | None = None) -> Loaded:
    """Parquet with the lmms-lab POPE columns -> ``Loaded`` question records.

    Records carry ``category`` (the split), ``image`` (= ``image_source``) and ``row`` (the row
    in the parquet; ``Loaded.image_bytes(record)`` reads the encoded image on demand, so the
    images are not held in memory). ``split`` keeps one category. The ``question_id`` is the
    file's, or its ``id`` column where question ids repeat across categories (the original is
    kept as ``source_question_id``).
    """
    from datasets import Image, load_dataset

    files = parquet_files(path)
    ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                      cache_dir=cache_dir)
    missing = [c for c in PARQUET_COLUMNS if c not in ds.column_names]
    if missing:
        raise InputError(f"{path}: parquet lacks the lmms-lab POPE columns {missing} "
                         f"(has {ds.column_names}); expected {list(PARQUET_COLUMNS)} (+ image)")
    if "image" in ds.column_names and isinstance(ds.features["image"], Image):
        ds = ds.cast_column("image", Image(decode=False))
    if split is not None:
        found = sorted(set(ds["category"]))
        if split not in found:
            raise InputError(f"{path}: split {split!r} not in the parquet's categories {found}")
    # lmms-lab's question_id may restart per category; then the global "id" column keys rows.
    meta = ds.remove_columns("image") if "image" in ds.column_names else ds
    rows = [(i, r) for i, r in enumerate(meta) if split is None or r["category"] == split]
    qids = [str(r["question_id"]) for _, r in rows]
    id_key = "question_id"
    if len(set(qids)) != len(qids):
        ids = [str(r.get("id")) for _, r in rows]
        if "id" not in ds.column_names or len(set(ids)) != len(ids):
            raise InputError(f"{path}: question_id repeats and there is no unique 'id' column to "
                             "tell the questions apart; pass split= to keep one category")
        id_key = "id"
    out = Loaded(records=[], path=str(path), source=ds if "image" in ds.column_names else None)
    for i, row in rows:
        try:
            label = _label(row["answer"], "answer")
        except BadRecord as exc:
            raise InputError(f"{path}, row {i}: {exc}; fix the data file") from None
        qid = row[id_key]
        out.records.append({
            "question_id": int(qid) if isinstance(qid, str) and qid.isdigit() else qid,
            "source_question_id": row["question_id"],
            "image": row["image_source"],
            "text": row["question"],
            "label": label,
            "category": row["category"],
            "row": i,
        })
        out.locations.append(f"row {i}")
    _check_unique_ids(out, "question")
    return out


def split_from_filename(path: str | Path) -> str:
    """``coco_pope_popular.json`` -> ``popular``; a name without a split word -> its stem."""
    stem = Path(path).stem
    for split in SPLITS:
        if re.search(rf"(^|[^a-z]){split}([^a-z]|$)", stem.lower()):
            return split
    return stem


# --------------------------------------------------------------------------- answer parsers

ParserFn = Callable[[str], str]
_PARSERS: dict[str, ParserFn] = {}


def register_parser(name: str) -> Callable[[ParserFn], ParserFn]:
    """Decorator: register ``fn(text) -> 'yes' | 'no'`` under ``name``."""

    def deco(fn: ParserFn) -> ParserFn:
        if name in _PARSERS:
            raise ValueError(f"POPE parser {name!r} is already registered; pick another name")
        _PARSERS[name] = fn
        return fn

    return deco


def available_parsers() -> list[str]:
    return sorted(_PARSERS)


def get_parser(name: str) -> ParserFn:
    """The parser registered as ``name``; unknown names get a did-you-mean error."""
    if name in _PARSERS:
        return _PARSERS[name]
    close = difflib.get_close_matches(name.lower(), list(_PARSERS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InputError(f"unknown POPE answer parser {name!r}; {hint}available: "
                     f"{', '.join(available_parsers())}")


@register_parser("pope")
def parse_pope(text: str) -> str:
    """AoiDragon/POPE ``evaluate.py``: first sentence, no commas, negative words No/not/no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


@register_parser("opera")
def parse_opera(text: str) -> str:
    """shikiw/OPERA ``pope_eval.py``: whole text, No/not/no/NO or a word ending in n't."""
    words = text.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words)
    return "no" if negative else "yes"


def parse_answer(text: str, parser: str = "pope") -> str:
    """``text`` -> 'yes' or 'no' with the named parser."""
    return get_parser(parser)(text)


# --------------------------------------------------------------------------- metrics


def confusion(pred: str, label: str) -> str:
    """Per item: 'tp', 'fp', 'tn' or 'fn' with yes as the positive class."""
    if pred not in ("yes", "no") or label not in ("yes", "no"):
        raise ValueError(f"pred and label must be 'yes' or 'no', got pred={pred!r} label={label!r}")
    if pred == "yes":
        return "tp" if label == "yes" else "fp"
    return "tn" if label == "no" else "fn"


def metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | int]:
    """The ``evaluate.py`` formulas; 0.0 where the reference would divide by zero."""
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, f1, yes_ratio (+ counts) of parsed answers vs labels."""
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} predictions for {len(labels)} labels; they must pair up")
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for pred, label in zip(preds, labels):
        counts[confusion(pred, label)] += 1
    return metrics_from_counts(**counts)


def _as_loaded(data: Loaded | Sequence[dict], what: str) -> Loaded:
    if isinstance(data, Loaded):
        return data
    recs = list(data)
    return Loaded(records=recs, path=f"<{what}>", locations=[f"record {i + 1}" for i in range(len(recs))])


def match_answers(questions: Loaded | Sequence[dict], answers: Loaded | Sequence[dict], *,
                  skip_unanswered: bool = False) -> tuple[list[tuple[dict, dict]], int]:
    """Pair each question with its answer -> ``(pairs, n_unanswered)``.

    By ``question_id`` when every answer has one, by line order when none has. Answers to
    unknown questions are an error; unanswered questions are an error unless
    ``skip_unanswered``, which leaves them out and counts them.
    """
    qs, ans = _as_loaded(questions, "questions"), _as_loaded(answers, "answers")
    with_id = [i for i, a in enumerate(ans.records) if "question_id" in a]
    if not with_id:
        if len(ans) != len(qs):
            raise InputError(f"{ans.path} has {len(ans)} answers without question_id for "
                             f"{len(qs)} questions in {qs.path}; answers matched by line order "
                             "must be one per question, in order (or add question_id to each)")
        return list(zip(qs.records, ans.records)), 0
    if len(with_id) != len(ans):
        first = next(i for i, a in enumerate(ans.records) if "question_id" not in a)
        raise InputError(f"{ans.where(first)}: no question_id while other answers have one; give "
                         "every answer a question_id, or none (then matching is by line order)")
    by_id = {str(a["question_id"]): a for a in ans.records}
    known = {str(q["question_id"]) for q in qs.records}
    for i, a in enumerate(ans.records):
        if str(a["question_id"]) not in known:
            raise InputError(f"{ans.where(i)}: question_id {a['question_id']!r} is not in {qs.path}; "
                             "are these answers for another question file?")
    pairs = [(q, by_id[str(q["question_id"])]) for q in qs.records if str(q["question_id"]) in by_id]
    unanswered = len(qs) - len(pairs)
    if unanswered and not skip_unanswered:
        missing = [q["question_id"] for q in qs.records if str(q["question_id"]) not in by_id]
        raise InputError(f"{unanswered} questions of {qs.path} have no answer in {ans.path} (first: "
                         f"{missing[:5]}); finish the run, or pass skip_bad_lines=True "
                         "(CLI: --skip-bad-lines) to score the answered ones and count the rest")
    return pairs, unanswered


def judge(questions: Loaded | Sequence[dict], answers: Loaded | Sequence[dict], *,
          parser: str = "pope", split: str | None = None,
          skip_unanswered: bool = False) -> tuple[list[dict], int]:
    """Per item: ``{"question_id", "split", "label", "answer", "pred", "correct"}``.

    Returns ``(items, n_unanswered)``. The split of a question is its ``category`` / ``split``
    field, else ``split``, else "all".
    """
    fn = get_parser(parser)
    pairs, unanswered = match_answers(questions, answers, skip_unanswered=skip_unanswered)
    items = []
    for q, a in pairs:
        pred = fn(a["text"])
        items.append({
            "question_id": q["question_id"],
            "split": q.get("category") or q.get("split") or split or "all",
            "label": q["label"],
            "answer": a["text"],
            "pred": pred,
            "correct": pred == q["label"],
        })
    return items, unanswered


def aggregate(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-split metrics, ``overall`` (all items pooled) and ``mean`` (mean over splits)."""
    items = list(items)
    by_split: dict[str, list[Mapping[str, Any]]] = {}
    for it in items:
        by_split.setdefault(it["split"], []).append(it)

    def of(group: list[Mapping[str, Any]]) -> dict[str, float | int]:
        return pope_metrics([g["pred"] for g in group], [g["label"] for g in group])

    order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    splits = {s: of(by_split[s]) for s in order}
    out: dict[str, Any] = {"splits": splits, "overall": of(items)}
    if len(splits) > 1:
        out["mean"] = {m: sum(v[m] for v in splits.values()) / len(splits) for m in METRICS}
    return out


def score(questions: Loaded | Sequence[dict], answers: Loaded | Sequence[dict], *,
          parser: str = "pope", split: str | None = None,
          skip_unanswered: bool = False) -> dict[str, Any]:
    """Score one question set against its answers (see ``aggregate`` for the layout)."""
    items, unanswered = judge(questions, answers, parser=parser, split=split,
                              skip_unanswered=skip_unanswered)
    out = aggregate(items)
    out.update(parser=parser, unanswered=unanswered)
    return out


def score_files(question_paths: Sequence[str | Path], answer_paths: Sequence[str | Path], *,
                parser: str = "pope", skip_bad_lines: bool = False) -> dict[str, Any]:
    """Score answer files against question files, paired in order (one answer file per question
    file). ``.parquet`` question files load through ``load_parquet_questions``."""
    if len(question_paths) != len(answer_paths) or not question_paths:
        raise InputError(f"got {len(question_paths)} question files and {len(answer_paths)} answer "
                         "files; give one answer file per question file, in the same order")
    get_parser(parser)  # fail on a bad name before reading anything
    items: list[dict] = []
    files, skipped, unanswered = [], 0, 0
    for qpath, apath in zip(question_paths, answer_paths):
        if str(qpath).endswith(".parquet") or Path(qpath).is_dir():
            qs = load_parquet_questions(qpath)
        else:
            qs = load_questions(qpath, skip_bad_lines=skip_bad_lines)
        ans = load_answers(apath, skip_bad_lines=skip_bad_lines)
        got, missing = judge(qs, ans, parser=parser, split=split_from_filename(qpath),
                             skip_unanswered=skip_bad_lines)
        items.extend(got)
        skipped += qs.skipped + ans.skipped
        unanswered += missing
        files.append({"questions": str(qpath), "answers": str(apath), "scored": len(got),
                      "skipped_lines": qs.skipped + ans.skipped, "unanswered": missing,
                      "problems": qs.problems + ans.problems})
    out = aggregate(items)
    out.update(parser=parser, skipped_lines=skipped, unanswered=unanswered, files=files)
    return out


# --------------------------------------------------------------------------- question builder


def _as_coco(instances: Any):
    """A pycocotools ``COCO`` from a COCO instances dict, a path, or a ``COCO``."""
    from pycocotools.coco import COCO

    if isinstance(instances, COCO):
        return instances
    if isinstance(instances, (str, Path)):
        p = _check_path(instances, "COCO instances")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(str(p))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{p}: not a COCO instances file ({exc!r}); give "
                             "instances_val2014.json or a file of the same layout") from None
    if not isinstance(instances, Mapping):
        raise InputError(f"instances must be a COCO instances dict, a path or a pycocotools COCO, "
                         f"got {type(instances).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in instances]
    if missing:
        raise InputError(f"instances dict lacks {missing}; a COCO instances file has 'images', "
                         "'annotations' and 'categories'")
    coco = COCO()
    coco.dataset = dict(instances)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise InputError(f"instances dict is not in COCO layout ({exc!r}): each annotation needs "
                         "'id', 'image_id' and 'category_id', each image 'id' and 'file_name'") from None
    return coco


def image_objects(instances: Any) -> list[dict]:
    """``[{"image": file_name, "image_id": id, "objects": [names]}]`` in the file's image order.

    An image's objects are its distinct category names in the order of their first annotation.
    """
    coco = _as_coco(instances)
    out = []
    for img in coco.dataset["images"]:
        if "file_name" not in img:
            raise InputError(f"image {img.get('id')!r} of the instances has no 'file_name'; POPE "
                             "questions name images by file name")
        names: list[str] = []
        for ann in coco.imgToAnns.get(img["id"], []):
            cat = coco.cats.get(ann["category_id"])
            if cat is None:
                raise InputError(f"annotation {ann.get('id')!r} of image {img['id']} has category_id "
                                 f"{ann['category_id']!r}, which is not in 'categories'")
            if cat["name"] not in names:
                names.append(cat["name"])
        out.append({"image": img["file_name"], "image_id": img["id"], "objects": names})
    return out


def question_text(obj: str, template: str = DEFAULT_TEMPLATE) -> str:
    """``"apple"`` -> ``"Is there an apple in the image?"`` (article fixed for a/e/i/o/u)."""
    if obj[:1] in ("a", "e", "i", "o", "u") and obj and " a {}" in template:
        template = template.replace(" a {}", " an {}")
    return template.format(obj)


def object_counts(images: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Images containing each object, in first-seen order (``generate_ground_truth_objects``)."""
    counts: dict[str, int] = {}
    for im in images:
        for o in im["objects"]:
            counts[o] = counts.get(o, 0) + 1
    return counts


def co_occurrence(images: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per object, the objects seen with it, most frequent first, ties in first-seen order."""
    co: dict[str, dict[str, int]] = {}
    for im in images:
        objs = im["objects"]
        for o in objs:
            row = co.setdefault(o, {})
            for other in objs:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    return {o: [k for k, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)]
            for o, row in co.items()}


def _random_negative(rng: random.Random, pool: list[str], exclude: set[str], image: str) -> str:
    if all(o in exclude for o in pool):
        raise InputError(f"no negative object left for image {image!r}: every object of the "
                         "sampled images is in it or was asked; sample more images (num_images)")
    choice = rng.choice(pool)
    while choice in exclude:
        choice = rng.choice(pool)
    return choice


def _split_questions(images: Sequence[Mapping[str, Any]], split: str, per_image: int,
                     rng: random.Random, template: str, first_id: int) -> list[dict]:
    counts = object_counts(images)
    pool = list(counts)
    popular = [o for o, _ in sorted(counts.items(), key=lambda kv: kv[1], reverse=True)]
    co = co_occurrence(images)
    out: list[dict] = []
    qid = first_id

    def add(image: str, obj: str, label: str) -> None:
        nonlocal qid
        out.append({"question_id": qid, "image": image, "text": question_text(obj, template),
                    "label": label})
        qid += 1

    for im in images:
        asked: list[str] = []
        present = set(im["objects"])
        for pos in im["objects"][:per_image]:
            asked.append(pos)
            add(im["image"], pos, "yes")
            exclude = present | set(asked)
            if split == "random":
                neg = _random_negative(rng, pool, exclude, im["image"])
            else:
                ranked = popular if split == "popular" else co.get(pos, [])
                neg = next((o for o in ranked if o not in exclude), None)
                if neg is None:
                    neg = _random_negative(rng, pool, exclude, im["image"])
            asked.append(neg)
            add(im["image"], neg, "no")
    return out


def build_all_splits(instances: Any, num_images: int = 500, per_image: int = 3, seed: int = 0, *,
                     template: str = DEFAULT_TEMPLATE, first_id: int = 1) -> dict[str, list[dict]]:
    """The three POPE splits from one seeded draw (see the module docstring for the rules)."""
    if not isinstance(num_images, int) or num_images < 1:
        raise InputError(f"num_images must be a positive integer, got {num_images!r}")
    if not isinstance(per_image, int) or per_image < 1:
        raise InputError(f"per_image must be a positive integer, got {per_image!r}")
    if "{}" not in template:
        raise InputError(f"template {template!r} needs a '{{}}' where the object name goes")
    eligible = [im for im in image_objects(instances) if len(im["objects"]) >= per_image]
    if len(eligible) < num_images:
        raise InputError(f"only {len(eligible)} images have at least {per_image} objects, fewer "
                         f"than num_images={num_images}; lower num_images or per_image")
    rng = random.Random(seed)
    sampled = rng.sample(eligible, num_images)
    return {s: _split_questions(sampled, s, per_image, rng, template, first_id) for s in SPLITS}


def build_questions(instances: Any, split: str, num_images: int = 500, per_image: int = 3,
                    seed: int = 0, *, template: str = DEFAULT_TEMPLATE,
                    first_id: int = 1) -> list[dict]:
    """POPE questions of one split: ``num_images * per_image * 2`` records, half "yes".

    ``instances`` is a COCO instances dict, a path to one, or a pycocotools ``COCO``.
    """
    if split not in SPLITS:
        close = difflib.get_close_matches(str(split).lower(), SPLITS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InputError(f"unknown POPE split {split!r}; {hint}choose one of {', '.join(SPLITS)}")
    return build_all_splits(instances, num_images, per_image, seed, template=template,
                            first_id=first_id)[split]


def write_questions(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write question records as JSON lines (the official ``coco_pope_*.json`` format)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(dict(rec)) + "\n")
    return p
