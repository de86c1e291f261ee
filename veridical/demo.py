"""``veridical demo``: the README's main job.

On the built-in model and the built-in SynthCOCO world (test split), runs POPE (random and
adversarial) and CHAIR for the baseline and every registered method the model can run, each at
its published defaults, through the eval runner (``OUTPUT/<method>/<benchmark>``, resumable),
and prints one table. Without a shipped model it falls back to ``tiny-random:llava`` (random
weights: the numbers then only show the machinery). ``--quick`` runs a few items (CI uses it).
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


def _eval(argv: list[str], engine) -> dict:
    from .cli import build_parser
    from .evals.runner import evaluate

    args = build_parser().parse_args(["eval", *argv])
    return evaluate(args, engine=engine, quiet=True)


def run_demo(model: str | None = None, output: str = "runs/demo", quick: bool = False,
             pope_questions: int = 600, chair_images: int = 100, batch_size: int = 32,
             methods: list[str] | None = None) -> list[dict]:
    import veridical

    from .bench import applicable_methods

    ref = model or default_model()
    engine = veridical.load(ref)
    names = methods or applicable_methods(engine)
    names = ["none", *[m for m in names if m != "none"]]
    if quick:
        pope_questions, chair_images = 8, 3
    rows = []
    for name in names:
        start = time.perf_counter()
        row: dict = {"method": name}
        common = ["--model", ref, "--data", "builtin:synthcoco", "--method", name,
                  "--batch-size", str(batch_size)]
        for split in ("random", "adversarial"):
            out = Path(output) / name / f"pope-{split}"
            res = _eval(["pope", *common, "--split", split, "--limit", str(pope_questions),
                         "--output", str(out)], engine)
            row[f"{split}_acc"] = res["metrics"]["accuracy"]
            row[f"{split}_f1"] = res["metrics"]["f1"]
        out = Path(output) / name / "chair"
        res = _eval(["chair", *common, "--num-images", str(chair_images), "--output", str(out)],
                    engine)
        row.update({k: res["metrics"][k] for k in ("chair_s", "chair_i", "recall")})
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    table = Table(title=f"veridical demo: {ref} on builtin:synthcoco (test split), greedy; "
                        f"POPE {pope_questions} questions per split, CHAIR {chair_images} images")
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
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "demo.json").write_text(json.dumps({"model": ref, "rows": rows}, indent=2))
    return rows
