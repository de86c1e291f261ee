"""Bootstrap confidence intervals for eval results, paired across runs.

Resampling unit: the image (all questions of one image, or one caption, move together), since
answers about one image are not independent. Each run is reduced to per-image count vectors
(POPE: tp, fp, tn, fn per split; CHAIR: captions, captions with a hallucination, mentions,
hallucinated mentions, ground-truth objects, covered objects, words); a bootstrap draw reweights
the images with one multinomial draw shared by every run, so differences between runs are
paired. ``ci`` gives the 2.5 and 97.5 percentiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from veridical.errors import InputError


def pope_counts(samples: Sequence[Mapping[str, Any]], split: str | None) -> dict[str, np.ndarray]:
    """Per image: tp, fp, tn, fn of the (split's) questions (yes = positive)."""
    out: dict[str, np.ndarray] = {}
    for s in samples:
        meta = s["meta"]
        if split is not None and meta["split"] != split:
            continue
        key = str(meta.get("image") or meta["question_id"])
        counts = out.setdefault(key, np.zeros(4))
        pred_yes, label_yes = s["answer"] == "yes", meta["label"] == "yes"
        counts[(0 if label_yes else 1) if pred_yes else (3 if label_yes else 2)] += 1
    return out


def pope_metrics(c: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from count columns (..., 4) = tp, fp, tn, fn (0 where undefined, as pope.py)."""
    tp, fp, tn, fn = (c[..., i] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        total = tp + fp + tn + fn
        return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall,
                "f1": f1, "yes_ratio": (tp + fp) / total}


def chair_counts(per_caption: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {
        str(c["image_id"]): np.array([1, c["chair_s"], len(c["mentions"]), len(c["hallucinated"]),
                                      len(c["gt_objects"]), len(c["covered"]), c["words"]], float)
        for c in per_caption
    }


def chair_metrics(c: np.ndarray) -> dict[str, np.ndarray]:
    n, hall_caps, mentions, hallucinated, gt, covered, words = (c[..., i] for i in range(7))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"chair_s": hall_caps / n, "chair_i": np.where(mentions > 0, hallucinated / mentions, 0.0),
                "recall": np.where(gt > 0, covered / gt, 0.0), "length": words / n}


def bootstrap(runs: Sequence[dict[str, np.ndarray]], metrics, draws: int = 1000,
              seed: int = 0) -> list[dict[str, dict[str, float]]]:
    """For each run: every metric's value, 95% CI, and (runs after the first) the paired
    difference to the first run with its 95% CI."""
    units = sorted(runs[0])
    for r in runs[1:]:
        if sorted(r) != units:
            raise InputError("the runs cover different images; compare runs of the same data "
                             "(same --data, --split and --limit)")
    stacked = np.stack([np.stack([r[u] for u in units]) for r in runs])  # (runs, units, k)
    weights = np.random.default_rng(seed).multinomial(
        len(units), np.full(len(units), 1 / len(units)), size=draws)  # (draws, units)
    totals = np.einsum("du,ruk->rdk", weights, stacked)  # (runs, draws, k)
    point = [metrics(stacked[i].sum(0)) for i in range(len(runs))]
    boot = [metrics(totals[i]) for i in range(len(runs))]
    out = []
    for i in range(len(runs)):
        row = {}
        for name, value in point[i].items():
            lo, hi = np.nanpercentile(boot[i][name], [2.5, 97.5])
            entry = {"value": float(value), "ci": [float(lo), float(hi)]}
            if i > 0:
                diff = boot[i][name] - boot[0][name]
                dlo, dhi = np.nanpercentile(diff, [2.5, 97.5])
                entry["diff"] = float(value - point[0][name])
                entry["diff_ci"] = [float(dlo), float(dhi)]
            row[name] = entry
        out.append(row)
    return out
