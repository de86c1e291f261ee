"""``veridical heads profile``: profile a model's heads and write the profile with heatmaps.

``add_subcommands(subparsers)`` registers, on the main ``veridical`` parser::

    veridical heads profile --model REF [--data DIR|builtin:synthcoco] [--limit N] --out DIR

which computes (or takes from the cache, ``veridical.heads.profile.load_or_profile``) the head
profile of ``REF`` over the calibration images (``--data``: a folder of images, a SynthCOCO world
folder or ``builtin:synthcoco``, the default, resolved through ``veridical.world``), makes it the
model's profile in the cache (``save_model_profile``: a later ``veridical.load(REF)`` attaches it
as ``engine.head_profile``, which ``fia`` and ``var`` read, unless the model's folder holds its
own ``heads_profile.json``), writes ``DIR/profile.json`` and one
heatmap ``DIR/<score>.png`` per per-head score (layers x heads, matplotlib's Agg backend), and
prints a summary: the strongest heads of each score and the sink dimensions with the tokens
where they fire. Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .profile import (
    COUNTERFACTUALS,
    DEFAULT_DATA,
    DEFAULT_LIMIT,
    DEFAULT_PROMPT,
    HEAD_SCORES,
    load_or_profile,
    save_model_profile,
    save_profile,
)
from .scores import VAR_TAU, head_scores

_TITLES = {
    "vhd": "VHD ||A(v,x) - A(x)|| (VHR)",
    "text_norm": "text-only head output norm ||A(x)||",
    "image_norm": "head output norm with the image ||A(v,x)||",
    "image_attention": "attention share on image tokens",
    "visual_sensitivity": "visual sensitivity ||A(v) - A(v0)|| / ||A(v)||",
}


def write_heatmaps(profile: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One PNG per per-head score of ``profile`` in ``out_dir`` (layers on y, heads on x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    model = profile["model"]
    for name in HEAD_SCORES:
        values = head_scores(profile, name).numpy()
        layers, heads = values.shape
        fig, ax = plt.subplots(figsize=(min(3 + 0.25 * heads, 14), min(2 + 0.25 * layers, 12)))
        image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis",
                          interpolation="nearest")
        fig.colorbar(image, ax=ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{model['name']}: {_TITLES.get(name, name)}\n"
                     f"{profile['calibration']['items']} calibration items", fontsize=9)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def summary(profile: dict[str, Any], top: int = 5) -> str:
    """A few lines: the model, the calibration set, the top heads per score, the sink dims."""
    model, cal = profile["model"], profile["calibration"]
    lines = [
        f"model {model['name']} ({model['model_type']}): {model['num_layers']} layers x "
        f"{model['num_heads']} heads, fingerprint {model['fingerprint'][:16]}",
        f"calibration: {cal['items']} items from {cal['source']}",
    ]
    for name in HEAD_SCORES:
        values = head_scores(profile, name)
        heads = values.shape[1]
        order = values.flatten().argsort(descending=True)[:top].tolist()
        best = ", ".join(f"L{i // heads}H{i % heads}={values.flatten()[i]:.3g}" for i in order)
        lines.append(f"{name:>18}: mean {values.mean():.3g}; top {best}")
    sinks = profile["sinks"]
    if not sinks["dims"]:
        lines.append(f"sink dims: none (tau_eff={profile['settings']['tau_effective']:.3g}, "
                     f"layers {sinks['layers_examined']})")
    for detail in sinks["details"]:
        tokens = ", ".join(f"{t['token']!r} x{t['count']}" for t in detail["tokens"][:5])
        lines.append(f"sink dim {detail['dim']}: max |RMSNorm(h)| {detail['max_phi']:.3g}, "
                     f"layers {detail['layers']}, {detail['image_token_hits']} image / "
                     f"{detail['text_token_hits']} text token hits; tokens {tokens}")
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    import veridical
    from veridical.world import resolve_data

    engine = veridical.load(args.model, device=args.device, dtype=args.dtype)
    profile = load_or_profile(
        engine, resolve_data(args.data, args.world_split), args.cache_dir, limit=args.limit,
        prompt=args.prompt, world_split=args.world_split, refresh=args.refresh, progress=True,
        counterfactual=args.counterfactual, tau=args.tau, seed=args.seed,
    )
    out = Path(args.out)
    path = save_profile(profile, out / "profile.json")
    pngs = write_heatmaps(profile, out)
    attached = save_model_profile(profile, args.cache_dir)
    print(summary(profile))
    print(f"wrote {path} and {len(pngs)} heatmaps ({', '.join(p.name for p in pngs)}); "
          f"cached for veridical.load: {attached}")
    return 0


def add_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``heads profile`` on the main parser's subparsers."""
    heads = subparsers.add_parser("heads", help="per-head profiles (VHD, image attention, "
                                                "visual sensitivity) and sink dimensions")
    sub = heads.add_subparsers(dest="heads_command", required=True)
    p = sub.add_parser("profile", help="profile a model over calibration images; write "
                                       "profile.json and heatmaps")
    p.add_argument("--model", required=True, help="model folder, hub id, builtin:NAME or "
                                                  "tiny-random:ARCH")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"folder of images, SynthCOCO world folder or {DEFAULT_DATA} (default)")
    p.add_argument("--world-split", default="test", help="split of a SynthCOCO world")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"first N images (default {DEFAULT_LIMIT})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="calibration prompt")
    p.add_argument("--out", required=True, help="folder for profile.json and the heatmaps")
    p.add_argument("--counterfactual", default="blank", choices=COUNTERFACTUALS,
                   help="content-free image for visual sensitivity (default: blank)")
    p.add_argument("--tau", type=float, default=VAR_TAU,
                   help="massive-activation threshold at hidden size 4096 (VAR: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise counterfactual")
    p.add_argument("--cache-dir", default=None,
                   help="profile cache (default $VERIDICAL_CACHE/heads, where veridical.load "
                        "looks)")
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_profile)
    return heads


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m veridical.heads.cli heads profile ...``)."""
    from veridical.cli import standalone

    return standalone(add_subcommands, argv)


if __name__ == "__main__":
    sys.exit(main())
