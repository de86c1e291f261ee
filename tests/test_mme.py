"""MME: the response parser, acc / acc+ pairing, totals, result files and loaders."""

from __future__ import annotations

import pytest

from veridical.errors import InputError
from veridical.evals import mme


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        ("Yes", "yes"), ("no", "no"), ("NO", "no"),
        ("Yes, there is.", "yes"), ("No.", "no"),
        ("Not sure", "no"),        # 'no' within the first 4 characters
        ("Nope", "no"),
        ("yesno", "yes"),           # 'yes' is checked first
        ("I think yes", "other"),   # the answer is past the first 4 characters
        ("  yes", "other"),         # leading spaces push it out of the prefix
        ("There is a dog", "other"),
        ("", "other"),
    ],
)
def test_parse_response(response, parsed):
    assert mme.parse_response(response) == parsed


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


EXISTENCE = [
    # image 1: both right -> counts for acc+
    "000000006040.jpg\tIs there a train in this image? Please answer yes or no.\tYes\tYes",
    "000000006040.jpg\tIs there a bed in this image? Please answer yes or no.\tNo\tNo, there is not.",
    # image 2: 'other' (wrong) + right
    "000000044279.jpg\tIs there a dog in this image? Please answer yes or no.\tYes\tI think yes",
    "000000044279.jpg\tIs there a cat in this image? Please answer yes or no.\tNo\tno",
    # image 3: both wrong
    "000000067213.jpg\tIs there a car in this image? Please answer yes or no.\tYes\tno",
    "000000067213.jpg\tIs there a bus in this image? Please answer yes or no.\tNo\tYes",
]


def test_subtask_hand_computed(tmp_path):
    m = mme.score_result_file(write(tmp_path / "existence.txt", EXISTENCE))
    assert m["acc"] == 3 / 6
    assert m["acc_plus"] == 1 / 3
    assert m["score"] == pytest.approx(50 + 100 / 3)
    assert (m["questions"], m["images"], m["other"]) == (6, 3, 1)


def test_acc_plus_pairs_consecutive_lines():
    pairs = [(("Yes", "yes"), ("No", "yes")), (("Yes", "no"), ("No", "no"))]
    m = mme.subtask_metrics(pairs)
    assert m["acc"] == 0.5 and m["acc_plus"] == 0.0  # two right answers, but on two images
    m = mme.subtask_metrics([(("Yes", "yes"), ("No", "no")), (("Yes", "no"), ("No", "yes"))])
    assert m["acc"] == 0.5 and m["acc_plus"] == 0.5


def test_totals_and_hallucination_subset(tmp_path):
    perfect = [EXISTENCE[0], EXISTENCE[1]]
    for name in mme.HALLUCINATION:
        write(tmp_path / f"{name}.txt", EXISTENCE if name == "existence" else perfect)
    write(tmp_path / "notes.txt", ["not a subtask"])
    result = mme.score_results_dir(tmp_path)
    assert result["hallucination"] == pytest.approx((50 + 100 / 3) + 3 * 200)
    assert result["perception"] is None and result["cognition"] is None
    assert result["missing"] == [n for n in mme.SUBTASKS if n not in mme.HALLUCINATION]
    assert result["ignored"] == ["notes.txt"]
    for name in mme.SUBTASKS:
        write(tmp_path / f"{name}.txt", perfect)
    full = mme.score_results_dir(tmp_path)
    assert (full["perception"], full["cognition"], full["hallucination"]) == (2000.0, 800.0, 800.0)
    assert full["missing"] == []


def test_malformed_result_files_name_file_and_line(tmp_path):
    odd = write(tmp_path / "count.txt", EXISTENCE[:5])
    with pytest.raises(InputError, match=r"count.txt: 5 lines, an odd number: line 5 has no partner"):
        mme.read_result_file(odd)
    swapped = write(tmp_path / "color.txt", [EXISTENCE[0], EXISTENCE[2]])
    with pytest.raises(InputError, match=r"color.txt, lines 1-2: a pair names two images"):
        mme.read_result_file(swapped)
    tabs = write(tmp_path / "OCR.txt", [EXISTENCE[0], EXISTENCE[1] + "\textra"])
    with pytest.raises(InputError, match=r"OCR.txt, line 2: expected 4 tab-separated fields"):
        mme.read_result_file(tabs)
    gt = write(tmp_path / "scene.txt", [EXISTENCE[0], EXISTENCE[1].replace("\tNo\t", "\tMaybe\t")])
    with pytest.raises(InputError, match=r"scene.txt, line 2: ground truth"):
        mme.read_result_file(gt)
    # a trailing blank line is fine; CRLF line ends are read like the reference (text mode)
    (tmp_path / "posters.txt").write_bytes(("\r\n".join(EXISTENCE[:2]) + "\r\n\r\n").encode())
    assert len(mme.read_result_file(tmp_path / "posters.txt")) == 2
    with pytest.raises(InputError, match="does not exist"):
        mme.score_results_dir(tmp_path / "posters.txt")  # a file, not a folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="none of the MME result files"):
        mme.score_results_dir(empty)


def test_write_results_round_trip(tmp_path):
    records = [
        {"subtask": "count", "image": "a.jpg", "question": "Two dogs? Please answer yes or no.",
         "answer": "Yes", "response": "Yes,\nthere are\ttwo."},
        {"subtask": "existence", "image": "b.jpg", "question": "A cat?", "answer": "No", "response": "No"},
        {"subtask": "count", "image": "a.jpg", "question": "Three dogs?", "answer": "No", "response": "no"},
        {"subtask": "existence", "image": "b.jpg", "question": "A dog?", "answer": "Yes", "response": "yes"},
    ]
    written = mme.write_results(records, tmp_path / "out")
    assert [p.name for p in written] == ["existence.txt", "count.txt"]
    lines = (tmp_path / "out" / "count.txt").read_text().splitlines()
    assert lines[0] == "a.jpg\tTwo dogs? Please answer yes or no.\tYes\tYes, there are two."
    result = mme.score_results_dir(tmp_path / "out")
    assert result["subtasks"]["count"]["score"] == 200.0
    assert result["subtasks"]["existence"]["score"] == 200.0
    with pytest.raises(InputError, match="image 'a.jpg' has 1 answered questions, expected 2"):
        mme.write_results(records[:1], tmp_path / "bad")
    with pytest.raises(InputError, match="did you mean 'OCR'"):
        mme.write_results([dict(records[0], subtask="ocr")], tmp_path / "bad")


def make_release(root, with_missing_image=False):
    """Two subtasks: 'existence' (side by side) and 'artwork' (images/ + questions_answers_YN/)."""
    ex = root / "existence"
    ex.mkdir(parents=True)
    for stem in ("0002", "0001"):
        (ex / f"{stem}.jpg").write_bytes(b"jpg")
        (ex / f"{stem}.txt").write_text(f"Is there a dog {stem}?\tYes\nIs there a cat {stem}?\tNo\n")
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    (art / "images" / "10002.jpg").write_bytes(b"jpg")
    (art / "questions_answers_YN" / "10002.txt").write_text("Q1?\tNo\nQ2?\tYes\n")
    if with_missing_image:
        (art / "questions_answers_YN" / "10003.txt").write_text("Q1?\tNo\nQ2?\tYes\n")


def test_load_folder_both_layouts(tmp_path):
    make_release(tmp_path)
    loaded = mme.load_folder(tmp_path, ["existence", "artwork"])
    assert [(r["subtask"], r["image"], r["answer"]) for r in loaded] == [
        ("existence", "0001.jpg", "Yes"), ("existence", "0001.jpg", "No"),
        ("existence", "0002.jpg", "Yes"), ("existence", "0002.jpg", "No"),
        ("artwork", "10002.jpg", "No"), ("artwork", "10002.jpg", "Yes"),
    ]
    assert loaded.records[4]["image_path"].endswith("artwork/images/10002.jpg")
    assert loaded.records[0]["question_id"] == "existence/0001.jpg"
    # the records feed the writer directly
    out = mme.write_results([dict(r, response=r["answer"]) for r in loaded], tmp_path / "res")
    assert len(out) == 2
    with pytest.raises(InputError, match=r"lacks the subtask folders \['count'\]"):
        mme.load_folder(tmp_path, ["count"])
    with pytest.raises(InputError, match="did you mean 'existence'"):
        mme.load_folder(tmp_path, ["existance"])


def test_load_folder_missing_image_and_bad_question_file(tmp_path):
    make_release(tmp_path, with_missing_image=True)
    with pytest.raises(InputError, match=r"10003.txt: no image 10003.jpg/.png"):
        mme.load_folder(tmp_path, ["artwork"])
    loaded = mme.load_folder(tmp_path, ["artwork"], skip_missing_images=True)
    assert loaded.skipped == 1 and len(loaded) == 2
    (tmp_path / "existence" / "0001.txt").write_text("Is there a dog?\tYes\n")
    with pytest.raises(InputError, match=r"0001.txt: expected 2 lines"):
        mme.load_folder(tmp_path, ["existence"])
    (tmp_path / "existence" / "0001.txt").write_text("Is there a dog?\tYes\nIs there a cat? Maybe\n")
    with pytest.raises(InputError, match=r"0001.txt, line 2: expected 'question<TAB>Yes\|No'"):
        mme.load_folder(tmp_path, ["existence"])


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png", "OCR/0001.jpg"],
        "image": [{"bytes": b"png", "path": None}] * 3,
        "question": ["Q1? Please answer yes or no.", "Q2? Please answer yes or no.", "Q3?"],
        "answer": ["Yes", "No", "No"],
        "category": ["code_reasoning", "code_reasoning", "OCR"],
    }), tmp_path / "mme.parquet")
    loaded = mme.load_parquet(tmp_path / "mme.parquet", cache_dir=str(tmp_path / "cache"))
    assert [(r["subtask"], r["image"], r["answer"]) for r in loaded] == [
        ("code_reasoning", "0020.png", "Yes"), ("code_reasoning", "0020.png", "No"), ("OCR", "0001.jpg", "No")]
    assert loaded.image_bytes(loaded.records[0]) == b"png"
    with pytest.raises(InputError, match="did not come from a parquet file"):
        loaded.image_bytes({"question_id": "x"})
    only = mme.load_parquet(tmp_path / "mme.parquet", ["OCR"], cache_dir=str(tmp_path / "cache"))
    assert len(only) == 1
