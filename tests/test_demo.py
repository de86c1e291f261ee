"""`veridical demo --quick` runs end to end (the README's main job, on a few items)."""

from __future__ import annotations

import json

import pytest

from veridical.cli import main


def test_demo_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VERIDICAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--methods", "none,vcd", "--output", str(out)]) == 0
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "vcd"]
    for r in rows:
        assert 0 <= r["random_acc"] <= 1 and 0 <= r["chair_i"] <= 1
    assert "veridical demo" in capsys.readouterr().out
    assert (out / "vcd" / "pope-adversarial" / "results.json").is_file()
    intervals = json.loads((out / "demo.json").read_text())["intervals"]
    f1 = intervals["vcd"]["adversarial_f1"]
    assert f1["ci"][0] <= f1["value"] <= f1["ci"][1] and "diff_ci" in f1
    assert "diff" not in intervals["none"]["chair_i"]


@pytest.mark.slow  # a second demo run (minutes on 2 cores)
def test_demo_compares_opera_with_beam_search(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDICAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--methods", "opera_fast", "--output", str(out)]) == 0
    demo = json.loads((out / "demo.json").read_text())
    assert [r["method"] for r in demo["rows"]] == ["none", "beam5", "opera_fast"]
    record = json.loads((out / "beam5" / "chair" / "results.json").read_text())
    assert record["run"]["decoding"]["num_beams"] == 5 and record["run"]["method"] == "none"
    chair_i = demo["intervals"]["opera_fast"]["chair_i"]
    assert "diff_beam_ci" in chair_i and "diff_beam" not in demo["intervals"]["beam5"]["chair_i"]
    # the searches answer the first fifth of each POPE split, paired with none on those
    for name, items in (("none", 8), ("beam5", 2), ("opera_fast", 2)):
        record = json.loads((out / name / "pope-random" / "results.json").read_text())
        assert record["run"]["items"] == items
    assert demo["search_pope_questions"] == 2
    assert "diff_ci" in demo["intervals"]["opera_fast"]["random_f1"]


def test_the_searches_answer_a_fifth_of_pope():
    from veridical.demo import is_search, search_questions

    assert [search_questions(n) for n in (300, 1000, 8, 1)] == [60, 200, 2, 1]
    assert [is_search(n) for n in ("beam5", "opera", "opera_fast", "none", "vcd")] == [
        True, True, True, False, False]
