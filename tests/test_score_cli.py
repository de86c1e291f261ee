"""``veridical score {pope,chair,mme}``: tables, JSON and one-line errors on crafted files."""

from __future__ import annotations

import json

import pytest

from tests.test_chair import CAPTIONS, coco_dir
from tests.test_mme import EXISTENCE
from tests.test_pope import QUESTIONS
from veridical.evals import score_cli


def run(capsys, *argv):
    code = score_cli.main(["score", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pope_json_and_table(tmp_path, capsys):
    q = _jsonl(tmp_path / "coco_pope_random.json", QUESTIONS)
    a = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "Yes"},
                                           {"question_id": 2, "text": "There isn't a cat."},
                                           {"question_id": 3, "text": "yes"},
                                           {"question_id": 4, "text": "No."}])
    code, out, _ = run(capsys, "pope", "--questions", q, "--answers", a, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["splits"]["random"]["accuracy"] == 0.75 and result["parser"] == "pope"
    code, out, _ = run(capsys, "pope", "--questions", q, "--answers", a, "--parser", "opera", "--json")
    assert json.loads(out)["overall"]["accuracy"] == 1.0
    code, out, _ = run(capsys, "pope", "--questions", q, "--answers", a)
    assert code == 0 and "random" in out and "75.00" in out and "overall" in out


def test_pope_errors_are_one_line(tmp_path, capsys):
    q = _jsonl(tmp_path / "coco_pope_random.json", QUESTIONS)
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"question_id": 1, "text": "yes"}\n{broken\n')
    code, _, err = run(capsys, "pope", "--questions", q, "--answers", str(bad))
    assert code == 2 and "answers.jsonl, line 2: invalid JSON" in err and "Traceback" not in err
    code, _, err = run(capsys, "pope", "--questions", q, "--answers", str(bad), "--parser", "vcd")
    assert code == 2 and "unknown POPE answer parser 'vcd'" in err
    code, out, _ = run(capsys, "pope", "--questions", q, "--answers", str(bad), "--skip-bad-lines")
    assert code == 0 and "skipped 1 malformed lines, 3 unanswered questions" in out


def test_chair_json_table_and_per_caption(tmp_path, capsys):
    d = coco_dir(tmp_path)
    caps = _jsonl(tmp_path / "captions.jsonl", CAPTIONS)
    per = tmp_path / "per.jsonl"
    code, out, _ = run(capsys, "chair", "--captions", caps, "--annotations", str(d), "--json",
                       "--per-caption", str(per))
    assert code == 0
    result = json.loads(out)
    assert result["metrics"]["chair_s"] == 2 / 3 and result["metrics"]["chair_i"] == 4 / 9
    assert result["settings"]["singularizer"] == "pattern"
    rows = [json.loads(line) for line in per.read_text().splitlines()]
    assert rows[0]["hallucinated"] == [["cat", "cat"]] and rows[2]["covered"] == []
    code, out, _ = run(capsys, "chair", "--captions", caps, "--annotations", str(d),
                       "--no-double-space-quirk", "--singularizer", "wordnet-noun")
    assert code == 0 and "66.67" in out and "44.44" in out and "wordnet-noun" in out
    ids = tmp_path / "ids.txt"
    ids.write_text("2\n")
    code, out, _ = run(capsys, "chair", "--captions", caps, "--annotations", str(d),
                       "--image-ids", str(ids), "--json")
    assert json.loads(out)["metrics"]["captions"] == 1
    code, _, err = run(capsys, "chair", "--captions", caps, "--annotations", str(tmp_path / "nope"))
    assert code == 2 and "annotations folder" in err


def test_mme_json_and_table(tmp_path, capsys):
    (tmp_path / "existence.txt").write_text("\n".join(EXISTENCE) + "\n")
    code, out, _ = run(capsys, "mme", "--results", str(tmp_path), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["subtasks"]["existence"]["score"] == pytest.approx(50 + 100 / 3)
    assert result["perception"] is None and "count" in result["missing"]
    code, out, _ = run(capsys, "mme", "--results", str(tmp_path))
    assert code == 0 and "existence" in out and "83.33" in out and "missing result files" in out
    (tmp_path / "count.txt").write_text("\n".join(EXISTENCE[:3]) + "\n")
    code, _, err = run(capsys, "mme", "--results", str(tmp_path))
    assert code == 2 and "count.txt: 3 lines, an odd number: line 3 has no partner" in err


def test_wired_into_the_main_cli(tmp_path, capsys):
    from veridical.cli import main

    (tmp_path / "existence.txt").write_text("\n".join(EXISTENCE[:2]) + "\n")
    assert main(["score", "mme", "--results", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subtasks"]["existence"]["score"] == 200.0
