"""The ``veridical`` command line.

Subcommands: ``generate``, ``methods``, ``bench``, and those other modules add (``score``,
``world``, ...). Errors the user can fix (a bad path, an unknown method, an out-of-range value)
print one line ``error: ...`` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from .decoding.registry import parse_method_sets as parse_sets
from .errors import VeridicalError

console = Console()


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers such as 1,8")
    return values


def add_decoding_args(parser: argparse.ArgumentParser, seed_help: str | None = None) -> None:
    parser.add_argument("--method", default="none", help="mitigation, e.g. vcd or vhr+vcd")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="sets",
                        help="method parameter (repeatable), e.g. --set alpha=1")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None,
                        help=seed_help or "random seed (sampling, random branches); default: a "
                                          "fresh one, printed with --json")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                        help="veridical's own engine (every method; default) or vLLM (the "
                             "contrastive family; see `veridical methods --backend vllm`)")
    parser.add_argument("--vllm-arg", action="append", metavar="KEY=VALUE", dest="vllm_args",
                        help="a vLLM engine argument (repeatable), e.g. "
                             "--vllm-arg tensor_parallel_size=2; values are JSON or text")


def vllm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--vllm-arg KEY=VALUE`` pairs as keyword arguments (JSON values, else text)."""
    out: dict[str, Any] = {}
    for item in getattr(args, "vllm_args", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VeridicalError(f"--vllm-arg {item!r} must look like KEY=VALUE, e.g. "
                                 "tensor_parallel_size=2")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    if out and getattr(args, "backend", "transformers") != "vllm":
        raise VeridicalError("--vllm-arg needs --backend vllm")
    return out


def load_for(args: argparse.Namespace, **kwargs: Any):
    """The engine the command's ``--model`` and ``--backend`` name."""
    import veridical

    backend = getattr(args, "backend", "transformers")
    return veridical.load(args.model, backend=backend, **kwargs, **vllm_kwargs(args))


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "method": args.method,
        "method_args": parse_sets(args.sets),
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "num_beams": args.num_beams,
        "seed": args.seed,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    images = args.image or []
    if len(args.prompt) > 1 and len(images) not in (0, len(args.prompt)):
        raise VeridicalError(
            f"got {len(images)} --image for {len(args.prompt)} --prompt; give one image per "
            "prompt, or none"
        )
    if len(images) > 1 and len(args.prompt) != len(images):
        raise VeridicalError(f"got {len(images)} --image for {len(args.prompt)} --prompt")
    engine = load_for(args, device=args.device, dtype=args.dtype)
    image_list = images if images else [None] * len(args.prompt)
    results = engine.generate(image_list, args.prompt, stop=args.stop, **decoding_kwargs(args))
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            print(r.text)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import veridical

    from .vllm.backend import vllm_methods

    listing = veridical.methods()
    on_vllm = set(vllm_methods())
    for m in listing:
        m["backends"] = ["transformers", "vllm"] if m["name"] in on_vllm else ["transformers"]
    if args.backend is not None:
        listing = [m for m in listing if args.backend in m["backends"]]
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    title = "Mitigation methods (compose with '+', set parameters with --set)"
    if args.backend is not None:
        title += f"; those the {args.backend} backend runs"
    table = Table(title=title)
    for col in ("method", "description", "parameters (default; range)", "runs on"):
        table.add_column(col)
    for m in listing:
        params = "\n".join(f"{p['name']} = {p['default']!r}; {p['range']}" for p in m["params"])
        table.add_row(m["name"], m["description"], params or "-", ", ".join(m["backends"]))
    console.print(table)
    return 0


def _print_rows(args: argparse.Namespace, rows: list[dict], title: str,
                columns: list[tuple[str, Any]], caption: str | None = None) -> None:
    """Rows as JSON (``--json``) or as a table with ``(header, cell function)`` columns."""
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    import torch

    table = Table(title=f"{title}, {args.model}, greedy, {args.max_new_tokens} new tokens, "
                        f"torch threads {torch.get_num_threads()}", caption=caption)
    for header, _ in columns:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    console.print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import veridical

    from .bench import bench_engine

    torch.manual_seed(0)
    engine = veridical.load(args.model, device=args.device)
    rows = bench_engine(engine, args.batch_size, args.max_new_tokens, args.repeats)
    _print_rows(args, rows, "engine vs transformers generate", [
        ("batch", lambda r: str(r["batch_size"])),
        ("engine tok/s", lambda r: f"{r['engine_tokens_per_s']:.1f}"),
        ("HF tok/s", lambda r: f"{r['hf_tokens_per_s']:.1f}"),
        ("time/token ratio (engine/HF)", lambda r: f"{r['time_ratio']:.3f}"),
    ])
    return 0


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def cmd_bench_methods(args: argparse.Namespace) -> int:
    import veridical

    from .bench import bench_methods

    engine = veridical.load(args.model, device=args.device)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    rows = bench_methods(engine, args.batch_size, methods, args.max_new_tokens, args.repeats,
                         args.ignore_eos)
    title = "per-token time vs baseline" + (", EOS ignored" if args.ignore_eos else "")
    _print_rows(args, rows, title, [
        ("batch", lambda r: str(r["batch_size"])),
        ("method", lambda r: r["method"]),
        ("tok/s", lambda r: f"{r['tokens_per_s']:.1f}"),
        ("time/token vs none", lambda r: f"{r['time_per_token_ratio']:.2f}x"),
        ("first token vs none", lambda r: f"{r['first_token_ratio']:.2f}x"),
        ("decode/token vs none", lambda r: _ratio(r["decode_per_token_ratio"])
         + ("*" if r["decode_timing"] == "split" else "")),
        ("vs beam search (time/token; decode/token*)",
         lambda r: f"{r['time_per_token_vs_beam']:.2f}x; "
                   f"{_ratio(r['decode_per_token_vs_beam'])}" if "time_per_token_vs_beam" in r
         else ""),
    ], caption="decode/token: median over rounds of the per-round ratio of the decoding's "
               "time per token, from the tokens' timestamps; * searches that report their "
               "tokens only at the end: (best call - best first-token call) / later tokens")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    run_demo(args.model, args.output, args.quick, args.pope_questions, args.chair_images,
             args.batch_size, methods, args.bootstrap)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veridical",
        description="Hallucination mitigation for vision-language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for image + prompt pairs")
    gen.add_argument("--model", required=True, help="model folder, hub id, builtin:NAME or tiny-random:ARCH")
    gen.add_argument("--image", action="append", help="image path (repeatable, one per prompt)")
    gen.add_argument("--prompt", action="append", required=True, help="user text (repeatable)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None)
    gen.add_argument("--json", action="store_true", help="print results as JSON")
    add_backend_args(gen)
    add_decoding_args(gen)
    gen.set_defaults(func=cmd_generate)

    meth = sub.add_parser("methods", help="list the mitigation methods and their parameters")
    meth.add_argument("--json", action="store_true")
    meth.add_argument("--backend", choices=("transformers", "vllm"), default=None,
                      help="list only the methods this backend runs (default: all, with a "
                           "'runs on' column)")
    meth.set_defaults(func=cmd_methods)

    bench = sub.add_parser("bench", help="speed benchmarks (ratios measured side by side)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="engine vs transformers generate, tokens/s")
    eng.add_argument("--model", default="tiny-random:llava")
    eng.add_argument("--batch-size", type=_int_list, default=[1, 8])
    eng.add_argument("--max-new-tokens", type=int, default=32)
    eng.add_argument("--repeats", type=int, default=3)
    eng.add_argument("--device", default=None)
    eng.add_argument("--json", action="store_true")
    eng.set_defaults(func=cmd_bench)
    meth_b = bench_sub.add_parser("methods", help="per-token time of each method vs baseline")
    meth_b.add_argument("--model", default="tiny-random:llava")
    meth_b.add_argument("--batch-size", type=_int_list, default=[1, 8])
    meth_b.add_argument("--methods", default=None,
                        help="comma list (default: all applicable); NAME:KEY=VALUE[:KEY=VALUE] "
                             "runs a method away from its defaults, e.g. pai:gamma=1")
    meth_b.add_argument("--max-new-tokens", type=int, default=32)
    meth_b.add_argument("--repeats", type=int, default=3)
    meth_b.add_argument("--ignore-eos", action="store_true",
                        help="every request decodes --max-new-tokens tokens (EOS does not end "
                             "it), so methods that change answer lengths are timed on the same "
                             "batch widths; leaves out searches (OPERA)")
    meth_b.add_argument("--device", default=None)
    meth_b.add_argument("--json", action="store_true")
    meth_b.set_defaults(func=cmd_bench_methods)
    from veridical.bench import add_backends_bench
    from veridical.kernels.bench import add_bench as add_kernel_bench
    from veridical.server.bench import add_bench as add_serve_bench

    add_kernel_bench(bench_sub)
    add_serve_bench(bench_sub)
    add_backends_bench(bench_sub)

    demo = sub.add_parser("demo", help="the main job: every method on the built-in model")
    demo.add_argument("--model", default=None, help="default: the built-in model")
    demo.add_argument("--output", default="runs/demo",
                      help="results folder (rerun to resume; default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a few items only (for CI)")
    demo.add_argument("--methods", default=None, help="comma list (default: all applicable)")
    demo.add_argument("--pope-questions", type=int, default=200,
                      help="questions per POPE split (default: 200; the searches answer a fifth)")
    demo.add_argument("--chair-images", type=int, default=60,
                      help="CHAIR images to caption (default: 60)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--bootstrap", type=int, default=1000,
                      help="bootstrap draws for the interval table (0 = none)")
    demo.set_defaults(func=cmd_demo)

    # every other command, registered explicitly (a module with a bug fails loudly here)
    from veridical.evals.cli import add_subcommands as add_eval
    from veridical.evals.score_cli import add_subcommands as add_score
    from veridical.heads.cli import add_subcommands as add_heads
    from veridical.server.cli import add_subcommands as add_serve
    from veridical.world.generate import add_subcommands as add_world

    for add in (add_score, add_world, add_eval, add_heads, add_serve):
        add(sub)
    return parser


def run_command(args: argparse.Namespace, verbose: bool = False) -> int:
    """Run a parsed subcommand: fixable errors print ``error: ...`` and return 2."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (VeridicalError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume (finished items are kept)",
              file=sys.stderr)
        return 130


def standalone(add_subcommands, argv: Sequence[str] | None, prog: str = "veridical",
               verbose: bool = False) -> int:
    """A module's own entry point over just its subcommands, run like ``main``."""
    parser = argparse.ArgumentParser(prog=prog)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv), verbose)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
