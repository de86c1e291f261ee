"""`veridical demo --quick` runs end to end (the README's main job, on a few items)."""

from __future__ import annotations

import json

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
