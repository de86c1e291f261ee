"""``veridical demo``: the README's main job.

Runs every registered method on a small image with the built-in model when it is shipped, and
otherwise on ``tiny-random:llava`` (random weights: the text is noise, the run shows the
machinery), and prints one table: method, output, tokens, seconds.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

import veridical

from .bench import bench_images
from .loading import BUILTIN_MODELS

console = Console()


def default_model() -> str:
    shipped = BUILTIN_MODELS["synthcoco-llava"].is_dir()
    return "builtin:synthcoco-llava" if shipped else "tiny-random:llava"


def run_demo(model: str | None = None, max_new_tokens: int = 16) -> list[dict]:
    ref = model or default_model()
    engine = veridical.load(ref)
    image = bench_images(1)[0]
    rows = []
    for info in veridical.methods():
        if info["name"].startswith("test_"):
            continue
        start = time.perf_counter()
        result = engine.generate(image, "describe this image in detail .", method=info["name"],
                                 max_new_tokens=max_new_tokens)
        rows.append({"method": info["name"], "text": result.text,
                     "tokens": result.completion_tokens,
                     "seconds": time.perf_counter() - start})
    table = Table(title=f"veridical demo on {ref}")
    for col in ("method", "output", "tokens", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], r["text"], str(r["tokens"]), f"{r['seconds']:.2f}")
    console.print(table)
    return rows
