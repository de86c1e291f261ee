"""MME: load the benchmark, write official result files, score them like ``calculation.py``.

Reference: BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation,
``tools/eval_tool.zip`` -> ``eval_tool/calculation.py``.

Data
    The official release folder holds 14 subtask folders. artwork, celebrity, landmark, posters
    and scene keep images in ``images/`` and questions in ``questions_answers_YN/{stem}.txt``;
    the other nine keep ``{stem}.txt`` beside the image. Each txt has two lines
    ``question<TAB>Yes|No``. ``load_folder`` returns one record per question:
    ``{"question_id": "subtask/image", "subtask", "image", "image_path", "question",
    "answer"}``, images in file-name order, the two questions of an image consecutive.
    ``load_parquet`` reads the lmms-lab MME parquet (columns ``question_id``, ``question``,
    ``answer``, ``category``, ``image``) into the same records with ``row`` instead of
    ``image_path``; ``Loaded.image_bytes(record)`` reads the encoded image on demand.

Result files (``write_results`` / ``score_results_dir``)
    One ``{subtask}.txt`` per subtask (``OCR.txt`` upper case, as the reference opens it), one
    line per question ``image<TAB>question<TAB>Yes|No<TAB>response``, the two questions of an
    image on consecutive lines. Responses are written on one line: tabs and line breaks become
    spaces.

Scoring (exactly ``calculation.py``)
    A response is lowercased; exactly 'yes' or 'no' is kept; otherwise its first 4 characters
    decide: 'yes' in them -> yes, elif 'no' in them -> no, else 'other' (always wrong).
    acc = correct answers / questions; acc_plus = images with both answers correct / images;
    score = 100 * acc + 100 * acc_plus (max 200). perception = sum of the 10 perception
    subtasks (max 2000), cognition = sum of the 4 cognition subtasks (max 800), hallucination =
    existence + count + position + color (max 800); a total is ``None`` when one of its subtask
    files is missing (listed under ``missing``) rather than a silently smaller number.
    Stricter than the reference, which would crash or mis-pair: a line without exactly four
    tab-separated fields, a ground truth other than yes/no, an odd number of lines, or the two
    lines of a pair naming different images raise ``InputError`` naming the file and line.
    A blank line at the very end of a file is ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from veridical.errors import InputError

from .pope import Loaded, parquet_files

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
HALLUCINATION = ("existence", "count", "position", "color")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
HIGHER_IS_BETTER = {"perception": True, "cognition": True, "hallucination": True}


def _check_subtasks(subtasks: Sequence[str] | None) -> tuple[str, ...]:
    if subtasks is None:
        return SUBTASKS
    for name in subtasks:
        if name not in SUBTASKS:
            lower = {s.lower(): s for s in SUBTASKS}
            close = difflib.get_close_matches(str(name).lower(), list(lower), n=1)
            hint = f"did you mean {lower[close[0]]!r}? " if close else ""
            raise InputError(f"unknown MME subtask {name!r}; {hint}available: {', '.join(SUBTASKS)}")
    return tuple(subtasks)


# --------------------------------------------------------------------------- loading


def _read_qa_file(path: Path) -> list[tuple[str, str]]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) != 2:
        raise InputError(f"{path}: expected 2 lines 'question<TAB>Yes|No', found {len(lines)}; "
                         "each MME image has exactly two questions")
    out = []
    for lineno, line in enumerate(lines, start=1):
        question, sep, answer = line.rpartition("\t")
        if not sep or answer.strip().lower() not in ("yes", "no"):
            raise InputError(f"{path}, line {lineno}: expected 'question<TAB>Yes|No', got {line!r}")
        out.append((question, answer.strip()))
    return out


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_folder(root: str | Path, subtasks: Sequence[str] | None = None, *,
                skip_missing_images: bool = False) -> Loaded:
    """Records of the official MME release folder (see the module docstring).

    A question file whose image is missing raises, or with ``skip_missing_images`` is skipped
    (its two questions) and counted in ``Loaded.skipped``.
    """
    base = Path(root)
    names = _check_subtasks(subtasks)
    if not base.is_dir():
        raise InputError(f"MME folder {str(base)!r} does not exist; point it at the unpacked "
                         "MME_Benchmark_release_version folder")
    absent = [n for n in names if not (base / n).is_dir()]
    if absent:
        raise InputError(f"{base} lacks the subtask folders {absent}; point it at the folder that "
                         f"holds {', '.join(SUBTASKS[:3])}, ... (MME_Benchmark_release_version)")
    out = Loaded(records=[], path=str(base))
    for name in names:
        folder = base / name
        qa_folder = folder / "questions_answers_YN"
        if qa_folder.is_dir():
            txts, image_folder = sorted(qa_folder.glob("*.txt")), folder / "images"
        else:
            txts, image_folder = sorted(folder.glob("*.txt")), folder
        if not txts:
            raise InputError(f"{folder}: no question files (*.txt); is the release unpacked fully?")
        for txt in txts:
            image = _find_image(image_folder, txt.stem)
            if image is None:
                if not skip_missing_images:
                    raise InputError(f"{txt}: no image {txt.stem}.jpg/.png in {image_folder}; restore "
                                     "it, or pass skip_missing_images=True to skip and count it")
                out.skipped += 1
                out.problems.append(f"{txt}: image missing")
                continue
            for lineno, (question, answer) in enumerate(_read_qa_file(txt), start=1):
                out.records.append({
                    "question_id": f"{name}/{image.name}", "subtask": name, "image": image.name,
                    "image_path": str(image), "question": question, "answer": answer,
                })
                out.locations.append(f"{txt.relative_to(base)}, line {lineno}")
    return out


def load_parquet(path: str | Path, subtasks: Sequence[str] | None = None, *,
                 cache_dir: str | None = None) -> Loaded:
    """Records of the lmms-lab MME parquet (one or more local files, or a folder of them)."""
    from datasets import Image, load_dataset

    names = set(_check_subtasks(subtasks))
    files = parquet_files(path)
    ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                      cache_dir=cache_dir)
    need = ("question_id", "question", "answer", "category")
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise InputError(f"{path}: parquet lacks the lmms-lab MME columns {missing} "
                         f"(has {ds.column_names})")
    if "image" in ds.column_names and isinstance(ds.features["image"], Image):
        ds = ds.cast_column("image", Image(decode=False))
    out = Loaded(records=[], path=str(path), source=ds if "image" in ds.column_names else None)
    meta = ds.remove_columns("image") if "image" in ds.column_names else ds
    for i, row in enumerate(meta):
        category = row["category"]
        if category not in SUBTASKS:
            raise InputError(f"{path}, row {i}: category {category!r} is not an MME subtask "
                             f"({', '.join(SUBTASKS)})")
        if category not in names:
            continue
        if str(row["answer"]).strip().lower() not in ("yes", "no"):
            raise InputError(f"{path}, row {i}: answer must be Yes or No, got {row['answer']!r}")
        out.records.append({
            "question_id": row["question_id"], "subtask": category,
            "image": Path(str(row["question_id"])).name, "question": row["question"],
            "answer": str(row["answer"]).strip(), "row": i,
        })
        out.locations.append(f"row {i}")
    return out


# --------------------------------------------------------------------------- result files


def _one_line(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").splitlines()) if text else ""


def result_line(image: str, question: str, answer: str, response: str) -> str:
    """One result-file line (no newline); tabs and line breaks in any field become spaces."""
    return "\t".join(_one_line(x) for x in (image, question, answer, response))


def write_results(records: Iterable[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``{subtask}.txt`` result files from records with ``subtask``, ``image``,
    ``question``, ``answer`` and ``response``; each image must have exactly two questions."""
    by_task: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in ("subtask", "image", "question", "answer", "response") if k not in rec]
        if missing:
            raise InputError(f"MME record {i}: missing {missing}; records need subtask, image, "
                             "question, answer and the model's response")
        _check_subtasks([rec["subtask"]])
        by_task.setdefault(rec["subtask"], {}).setdefault(rec["image"], []).append(rec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in (t for t in SUBTASKS if t in by_task):
        lines = []
        for image, recs in by_task[task].items():
            if len(recs) != 2:
                raise InputError(f"MME {task}: image {image!r} has {len(recs)} answered questions, "
                                 "expected 2 (acc+ pairs them); answer both or leave the image out")
            lines += [result_line(image, r["question"], r["answer"], r["response"]) for r in recs]
        path = out / f"{task}.txt"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        written.append(path)
    return written


def read_result_file(path: str | Path) -> list[tuple[int, str, str, str, str]]:
    """``[(line number, image, question, gt, response)]``; malformed lines raise."""
    p = Path(path)
    # Text mode with universal newlines, as the reference's open().readlines().
    with p.open(encoding="utf-8") as f:
        lines = f.readlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        fields = line[:-1].split("\t") if line.endswith("\n") else line.split("\t")
        if len(fields) != 4:
            raise InputError(f"{p}, line {lineno}: expected 4 tab-separated fields "
                             "'image, question, Yes|No, response', found "
                             f"{len(fields)}; responses must be on one line without tabs")
        image, question, gt, response = fields
        if gt.lower() not in ("yes", "no"):
            raise InputError(f"{p}, line {lineno}: ground truth (3rd field) must be Yes or No, "
                             f"got {gt!r}")
        rows.append((lineno, image, question, gt, response))
    if len(rows) % 2:
        raise InputError(f"{p}: {len(rows)} lines, an odd number: line {len(rows)} has no partner; "
                         "each image needs its two questions on consecutive lines")
    for a, b in zip(rows[::2], rows[1::2]):
        if a[1] != b[1]:
            raise InputError(f"{p}, lines {a[0]}-{b[0]}: a pair names two images ({a[1]!r}, "
                             f"{b[1]!r}); write the two questions of each image consecutively")
    return rows


# --------------------------------------------------------------------------- scoring


def parse_response(response: str) -> str:
    """``calculation.py``'s parser: 'yes', 'no' or 'other'."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def is_correct(gt: str, response: str) -> bool:
    """Per item: the parsed response equals the (lowercased) ground truth."""
    return parse_response(response) == gt.lower()


def subtask_metrics(pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]) -> dict[str, Any]:
    """acc, acc_plus, score (+ counts) from ``[((gt, response), (gt, response)), ...]`` per image."""
    if not pairs:
        raise ValueError("no image pairs to score; a subtask needs at least one image")
    correct = both = other = 0
    for pair in pairs:
        hits = [is_correct(gt, resp) for gt, resp in pair]
        correct += sum(hits)
        both += all(hits)
        other += sum(parse_response(resp) == "other" for _, resp in pair)
    n_questions = 2 * len(pairs)
    acc, acc_plus = correct / n_questions, both / len(pairs)
    task_score = 0.0  # summed in the reference's order: acc first, then acc_plus
    task_score += acc * 100
    task_score += acc_plus * 100
    return {"acc": acc, "acc_plus": acc_plus, "score": task_score, "questions": n_questions,
            "images": len(pairs), "other": other}


def score_result_file(path: str | Path) -> dict[str, Any]:
    rows = read_result_file(path)
    pairs = [((a[3], a[4]), (b[3], b[4])) for a, b in zip(rows[::2], rows[1::2])]
    if not pairs:
        raise InputError(f"{path}: no result lines; write the subtask's answers or delete the file")
    return subtask_metrics(pairs)


def totals(subtask_scores: Mapping[str, float]) -> dict[str, float | None]:
    """Perception, cognition and hallucination sums; ``None`` when a member is missing."""

    def total(members: Sequence[str]) -> float | None:
        if any(m not in subtask_scores for m in members):
            return None
        acc = 0.0
        for m in members:
            acc += subtask_scores[m]
        return acc

    return {"perception": total(PERCEPTION), "cognition": total(COGNITION),
            "hallucination": total(HALLUCINATION)}


def score_results_dir(results_dir: str | Path, subtasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Score every ``{subtask}.txt`` in ``results_dir``.

    Returns ``{"subtasks": {name: metrics}, "perception", "cognition", "hallucination",
    "missing": [...], "ignored": [other .txt files]}``.
    """
    d = Path(results_dir)
    if not d.is_dir():
        raise InputError(f"MME results folder {str(d)!r} does not exist; check --results")
    names = _check_subtasks(subtasks)
    scores = {n: score_result_file(d / f"{n}.txt") for n in names if (d / f"{n}.txt").is_file()}
    if not scores:
        found = sorted(p.name for p in d.glob("*.txt"))[:10]
        raise InputError(f"{d} has none of the MME result files ({', '.join(n + '.txt' for n in names[:3])}"
                         f", ...); found {found}. File names are the subtask names, e.g. OCR.txt")
    ignored = sorted(p.name for p in d.glob("*.txt") if p.stem not in SUBTASKS)
    out: dict[str, Any] = {"subtasks": scores}
    out.update(totals({k: v["score"] for k, v in scores.items()}))
    out["missing"] = [n for n in names if n not in scores]
    out["ignored"] = ignored
    return out
