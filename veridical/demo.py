"""``veridical demo``: the README's main job.

On the built-in model and the built-in SynthCOCO world (test split), runs POPE (random and
adversarial) and CHAIR for the baseline and every registered method the model can run, each at
its published defaults, through the eval runner (``OUTPUT/<method>/<benchmark>``, resumable),
and prints one table. Without a shipped model it falls back to ``tiny-random:llava`` (random
weights: the numbers then only show the machinery). ``--quick`` runs a few items (CI uses it).

The searches (5-beam search and OPERA) cost several times a greedy method per item, and most of
it on POPE's one-word answers, which they leave as greedy decoding gives them (the README's
results table); so they answer the first fifth of each POPE split's questions
(``search_questions``) and every CHAIR image. Every interval pairs a run with the baseline (and
OPERA with 5-beam search) on the items both ran.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .loading import BUILTIN_MODELS

console = Console(width=None if sys.stdout.isatty() else 120)


def default_model() -> str:
    shipped = (BUILTIN_MODELS["synthcoco-llava"] / "config.json").is_file()
    return "builtin:synthcoco-llava" if shipped else "tiny-random:llava"


def _eval(engine, benchmark: str, **settings) -> dict:
    from .evaluation import EvalConfig, evaluate

    return evaluate(engine, EvalConfig(benchmark, **settings), quiet=True)


BEAM = "beam5"  # the baseline with 5-beam search: what OPERA (5 beams) is compared with


def is_search(name: str) -> bool:
    """Whether the demo's run ``name`` is a search (5-beam search, OPERA)."""
    from .decoding.registry import resolve

    return name == BEAM or resolve(name).search() is not None


def search_questions(pope_questions: int) -> int:
    """POPE questions per split for a search: the first fifth (rounded up)."""
    return -(-pope_questions // 5)


def _bootstrapped(folder: Path, names: list[str], draws: int) -> dict[str, dict]:
    """value [95% CI] of every metric per run, and the paired difference to ``names[0]`` on
    the items both ran (a search answers fewer POPE questions; the same seed draws the same
    images for every pair, so runs of the same items get the same draws)."""
    from .evals import stats
    from .evals.runner import read_samples

    def paired(runs: dict[str, list[dict]], key: str, counts, metrics) -> dict[str, dict]:
        """name -> its bootstrap row, against names[0] restricted to the name's items."""
        rows = {}
        for n in names:
            mine = {item[key] for item in runs[n]}
            reference = [item for item in runs[names[0]] if item[key] in mine]
            pair = [runs[n]] if n == names[0] else [reference, runs[n]]
            rows[n] = stats.bootstrap([counts(p) for p in pair], metrics, draws)[-1]
        return rows

    out: dict[str, dict] = {n: {} for n in names}
    for split in ("random", "adversarial"):
        samples = {n: read_samples(str(folder / n / f"pope-{split}")) for n in names}
        rows = paired(samples, "id", lambda s: stats.pope_counts(s, None), stats.pope_metrics)
        for n, row in rows.items():
            out[n][f"{split}_f1"], out[n][f"{split}_acc"] = row["f1"], row["accuracy"]
    captions = {n: json.loads((folder / n / "chair" / "results.json").read_text())
                ["metrics"]["per_caption"] for n in names}
    rows = paired(captions, "image_id", stats.chair_counts, stats.chair_metrics)
    for n, row in rows.items():
        out[n].update(chair_s=row["chair_s"], chair_i=row["chair_i"], recall=row["recall"])
    return out


def intervals(output: str, names: list[str], draws: int = 1000) -> dict[str, dict]:
    """Per method: value [95% CI] and paired difference to ``none`` [95% CI] of POPE random
    and adversarial F1 and accuracy and of CHAIR_s / CHAIR_i (image-level bootstrap); search
    methods (OPERA) also get their paired difference to ``beam5`` (``diff_beam``)."""
    folder = Path(output)
    out = _bootstrapped(folder, names, draws)
    searches = [n for n in names if n.startswith("opera")]
    if BEAM in names and searches:
        vs_beam = _bootstrapped(folder, [BEAM, *searches], draws)
        for n in searches:
            for key, entry in vs_beam[n].items():
                out[n][key]["diff_beam"] = entry["diff"]
                out[n][key]["diff_beam_ci"] = entry["diff_ci"]
    return out


def markdown(ci: dict[str, dict]) -> str:
    """The interval table as markdown (value [CI], and for methods the paired difference)."""
    keys = ("random_f1", "adversarial_f1", "adversarial_acc", "chair_s", "chair_i", "recall")
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in ci.items():
        cells = []
        for k in keys:
            e = row[k]
            text = f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"
            if "diff" in e:
                text += f"<br>Δ {e['diff']:+.3f} [{e['diff_ci'][0]:+.3f}, {e['diff_ci'][1]:+.3f}]"
            if "diff_beam" in e:
                lo, hi = e["diff_beam_ci"]
                text += f"<br>Δbeam {e['diff_beam']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(model: str | None = None, output: str = "runs/demo", quick: bool = False,
             pope_questions: int = 200, chair_images: int = 60, batch_size: int = 32,
             methods: list[str] | None = None, draws: int = 1000) -> list[dict]:
    import veridical

    from .bench import applicable_methods

    ref = model or default_model()
    engine = veridical.load(ref)
    names = methods or applicable_methods(engine)
    names = ["none", *[m for m in names if m != "none"]]
    if any(n.startswith("opera") for n in names) and BEAM not in names:
        names.insert(1, BEAM)
    if quick:
        pope_questions, chair_images = 8, 3
    searched = search_questions(pope_questions)
    rows = []
    for name in names:
        start = time.perf_counter()
        row: dict = {"method": name}
        common = dict(model=ref, data="builtin:synthcoco", batch_size=batch_size,
                      method="none" if name == BEAM else name,
                      num_beams=5 if name == BEAM else 1)
        questions = searched if is_search(name) else pope_questions
        for split in ("random", "adversarial"):
            out = Path(output) / name / f"pope-{split}"
            res = _eval(engine, "pope", **common, split=split, limit=questions,
                        output=str(out))
            row[f"{split}_acc"] = res["metrics"]["accuracy"]
            row[f"{split}_f1"] = res["metrics"]["f1"]
        out = Path(output) / name / "chair"
        res = _eval(engine, "chair", **common, num_images=chair_images, output=str(out))
        row.update({k: res["metrics"][k] for k in ("chair_s", "chair_i", "recall")})
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    table = Table(title=f"veridical demo: {ref} on builtin:synthcoco (test split), greedy "
                        f"({BEAM} and opera: 5 beams); POPE {pope_questions} questions per "
                        f"split ({BEAM} and opera: the first {searched}), CHAIR {chair_images} "
                        "images")
    cols = ("method", "random_acc", "random_f1", "adversarial_acc", "adversarial_f1",
            "chair_s", "chair_i", "recall", "seconds")
    heads = ("method", "rand acc", "rand F1", "adv acc", "adv F1", "CHAIR_s", "CHAIR_i",
             "recall", "sec")
    for head in heads:
        table.add_column(head, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(*(f"{r[c]:.1f}" if c == "seconds" else f"{r[c]:.3f}"
                        if isinstance(r[c], float) else str(r[c]) for c in cols))
    console.print(table)
    ci = intervals(output, names, draws) if draws else {}
    if ci:
        print("\n95% bootstrap intervals over images; Δ = paired difference to none (greedy), "
              f"Δbeam = to {BEAM}, each on the items both ran:\n")
        print(markdown(ci))
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "demo.json").write_text(
        json.dumps({"model": ref, "pope_questions": pope_questions,
                    "search_pope_questions": searched, "chair_images": chair_images, "rows": rows, "intervals": ci}, indent=2))
    console.print(f"results: {Path(output).resolve()} (one folder per method and benchmark; "
                  "demo.json holds this table)")
    return rows
