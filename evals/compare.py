"""``veridical eval compare DIR ...``: result folders side by side, one benchmark at a time.

The runs are grouped by benchmark (in the order given); each group gets its own section:
- a markdown table of the headline metrics (``runner.headline``);
- with ``draws`` > 0, for POPE (per split: accuracy, F1, yes-ratio) and CHAIR (CHAIR_s, CHAIR_i,
  recall), each value with its 95% bootstrap interval over images and the paired difference to
  the group's first run (``stats.bootstrap``; the runs of a group must cover the same images);
  MME gets none;
- a bar chart (PNG) of the same metrics, with the intervals as error bars, "lower is better"
  marked on CHAIR_s and CHAIR_i, titled with the benchmark, the data and the model(s), the
  legend beside the bars. ``png`` is its path when the runs are of one benchmark; with several
  benchmarks each chart gets the benchmark's name before the suffix (``compare-pope.png``).

The text ends each section with the chart's absolute path.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veridical.errors import InputError

from . import stats
from .runner import headline, markdown_table, read_samples

NOTES = {"chair_s": "\n(lower is better)", "chair_i": "\n(lower is better)",
         "yes_ratio": "\n(0.5: no bias)"}  # under a metric's name in a chart
CHART_SKIPS = ("length", "perception", "cognition", "hallucination")  # other scales: not drawn
Row = tuple[str, dict[str, Any]]  # (run name, its results.json)


def compare(dirs: Sequence[str], png: str | None, draws: int = 0) -> str:
    """The comparison as markdown, one section per benchmark (module docstring); writes the
    charts when ``png`` is given."""
    groups: dict[str, list[tuple[str, Row]]] = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise InputError(f"{path} does not exist; pass folders written by `veridical eval`")
        results = json.loads(path.read_text())
        groups.setdefault(results["run"]["benchmark"], []).append((d, (Path(d).name, results)))
    sections = []
    for kind, members in groups.items():
        folders, rows = [d for d, _ in members], [row for _, row in members]
        text = f"## {kind.upper()}\n\n" + markdown_table(rows)
        ci = None
        if draws and kind in ("pope", "chair"):
            try:
                ci = intervals(kind, folders, draws)
            except InputError as exc:
                raise InputError(f"{kind.upper()} runs {', '.join(folders)}: {exc}; or pass "
                                 "--bootstrap 0 for the tables without intervals") from None
        if ci is not None:
            text += "\n\n" + ci_table(rows, ci)
        elif draws:
            text += f"\n\n(no bootstrap intervals for {kind.upper()}: POPE and CHAIR only)"
        if png:
            chart = chart_path(png, kind, several=len(groups) > 1)
            bar_chart(kind, rows, ci, chart)
            text += f"\n\nchart: {chart.resolve()}"
        sections.append(text)
    return "\n\n".join(sections)


def chart_path(png: str, kind: str, several: bool) -> Path:
    path = Path(png)
    return path.with_name(f"{path.stem}-{kind}{path.suffix or '.png'}") if several else path


def intervals(kind: str, folders: Sequence[str], draws: int) -> dict[str, list[dict]]:
    """Per metric label (``random accuracy``, ``chair_s``): one bootstrap entry per run (value,
    ci, and after the first run diff and diff_ci)."""
    if kind == "pope":
        splits = json.loads((Path(folders[0]) / "results.json").read_text())["metrics"][
            "per_split"]
        out = {}
        for split in splits:
            counts = [stats.pope_counts(read_samples(d), split) for d in folders]
            entries = stats.bootstrap(counts, stats.pope_metrics, draws)
            for key in ("accuracy", "f1", "yes_ratio"):
                out[f"{split} {key}"] = [e[key] for e in entries]
        return out
    per_caption = [json.loads((Path(d) / "results.json").read_text())["metrics"]["per_caption"]
                   for d in folders]
    entries = stats.bootstrap([stats.chair_counts(p) for p in per_caption], stats.chair_metrics,
                              draws)
    return {key: [e[key] for e in entries] for key in ("chair_s", "chair_i", "recall")}


def ci_table(rows: list[Row], ci: dict[str, list[dict]]) -> str:
    """Value [95% CI] per metric, and the paired difference to the first run [95% CI]."""
    lines = ["| run | " + " | ".join(ci) + " |", "|---" * (len(ci) + 1) + "|"]
    for i, (name, _) in enumerate(rows):
        cells = [name]
        for entries in ci.values():
            e = entries[i]
            text = f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"
            if "diff" in e:
                text += f" Δ {e['diff']:+.3f} [{e['diff_ci'][0]:+.3f}, {e['diff_ci'][1]:+.3f}]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(kind: str, rows: list[Row], ci: dict[str, list[dict]] | None, path: Path) -> None:
    """Grouped bars, one group per metric and one bar per run (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ci is not None:
        labels = list(ci)
        values = [[ci[k][i]["value"] for k in labels] for i in range(len(rows))]
        errors = [[[ci[k][i]["value"] - ci[k][i]["ci"][0] for k in labels],
                   [ci[k][i]["ci"][1] - ci[k][i]["value"] for k in labels]]
                  for i in range(len(rows))]
    else:
        labels = [k for k in headline(rows[0][1]) if k not in CHART_SKIPS]
        values = [[float(headline(res).get(k) or 0.0) for k in labels] for _, res in rows]
        errors = [None] * len(rows)
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) * len(rows) + 3), 4.5))
    for n, (name, _) in enumerate(rows):
        ax.bar([i + n * width for i in range(len(labels))], values[n], width, label=name,
               yerr=errors[n], capsize=3, error_kw={"elinewidth": 1})
    ticks = [label.replace(" ", "\n") + NOTES.get(label.split()[-1], "") for label in labels]
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(labels))], ticks)
    ax.set_ylabel("score" + (" (error bars: 95% bootstrap interval)" if ci is not None else ""))
    ax.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_title(title(kind, rows), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def title(kind: str, rows: list[Row]) -> str:
    """``POPE on <data folder> (<items> items)`` and the model(s)."""
    runs = [res["run"] for _, res in rows]
    models = sorted({run.get("model", "?") for run in runs})
    data = sorted({data_name(run.get("data", {})) for run in runs})
    items = sorted({str(run.get("items", "?")) for run in runs})
    head = f"{kind.upper()} on {', '.join(data)} ({', '.join(items)} items)"
    return "\n".join(textwrap.wrap(head, 90) + textwrap.wrap(f"model: {', '.join(models)}", 90))


def data_name(data: dict[str, Any]) -> str:
    """The folder the run's data files (and images) share, ``~`` for the home folder."""
    paths = [f["path"] for f in data.get("files", []) if f.get("path")]
    if not paths:
        return "?"
    folder = os.path.commonpath(paths + ([data["images"]] if data.get("images") else []))
    if len(Path(folder).parts) < 3:  # data and images far apart: the data files' folder
        folder = os.path.commonpath(paths)
    home = str(Path.home())
    return "~" + folder[len(home):] if folder.startswith(home + os.sep) else folder
