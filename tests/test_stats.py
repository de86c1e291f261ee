"""Bootstrap intervals: point values equal the scorers, intervals are paired and sensible."""

from __future__ import annotations

import numpy as np
import pytest

from veridical.errors import InputError
from veridical.evals import pope
from veridical.evals.stats import bootstrap, chair_metrics, pope_counts, pope_metrics


def pope_samples(answers, labels):
    return [{"answer": a, "meta": {"split": "random", "image": f"im{i // 6}", "label": lab,
                                   "question_id": i}}
            for i, (a, lab) in enumerate(zip(answers, labels))]


def test_point_values_equal_the_pope_scorer():
    rng = np.random.default_rng(0)
    labels = ["yes", "no"] * 60
    answers = [("yes" if rng.random() < 0.7 else "no") for _ in labels]
    (row,) = bootstrap([pope_counts(pope_samples(answers, labels), None)], pope_metrics, 200)
    ref = pope.pope_metrics(answers, labels)
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert row[k]["value"] == pytest.approx(ref[k], abs=1e-12)
        assert row[k]["ci"][0] <= row[k]["value"] <= row[k]["ci"][1]


def test_identical_runs_have_a_zero_paired_difference():
    labels = ["yes", "no"] * 30
    answers = ["yes"] * 45 + ["no"] * 15
    counts = pope_counts(pope_samples(answers, labels), None)
    _, second = bootstrap([counts, counts], pope_metrics, 100)
    assert second["f1"]["diff"] == 0 and second["f1"]["diff_ci"] == [0.0, 0.0]


def test_chair_metrics_from_counts():
    # two captions: (captions, hallucinating, mentions, hallucinated, gt, covered, words)
    c = np.array([[1, 1, 4, 1, 3, 2, 10], [1, 0, 2, 0, 2, 2, 6]], float).sum(0)
    m = chair_metrics(c)
    assert m["chair_s"] == 0.5 and m["chair_i"] == 1 / 6 and m["recall"] == 4 / 5
    assert m["length"] == 8


def test_runs_over_different_images_are_refused():
    a = {"x": np.ones(4)}
    b = {"y": np.ones(4)}
    with pytest.raises(InputError, match="different images"):
        bootstrap([a, b], pope_metrics, 10)
