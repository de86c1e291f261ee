"""``veridical eval {pope,chair,mme,compare}``: the runner's command line.

Each benchmark command builds an :class:`~veridical.evals.runner.EvalConfig` from its flags and
runs it through ``veridical.evaluation.evaluate`` (which resolves ``builtin:synthcoco``).
"""

from __future__ import annotations

import argparse
from typing import Any

from veridical.cli import add_backend_args, add_decoding_args, parse_sets, vllm_kwargs
from veridical.evaluation import evaluate

from .compare import compare
from .runner import BENCHMARKS, CHAIR_PROMPT, POPE_SUFFIX, EvalConfig

CONFIG_FIELDS = [f for f in EvalConfig.__dataclass_fields__ if f not in ("method_args", "vllm_args")]


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The run a parsed ``veridical eval <benchmark>`` asks for."""
    given = {f: getattr(args, f) for f in CONFIG_FIELDS if hasattr(args, f)}
    return EvalConfig(**given, method_args=parse_sets(args.sets), vllm_args=vllm_kwargs(args))


def add_subcommands(subparsers: Any) -> None:
    ev = subparsers.add_parser("eval", help="run POPE, CHAIR or MME on a model and score it")
    sub = ev.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        p = sub.add_parser(name, help=f"run {name.upper()}")
        p.add_argument("--model", required=True)
        p.add_argument("--data", required=True,
                       help="question/annotation file or folder, or builtin:synthcoco")
        p.add_argument("--images", default=None, help="folder of the images the data names")
        p.add_argument("--output", required=True, help="results folder (rerun to resume)")
        p.add_argument("--split", default=None,
                       help="POPE: random,popular,adversarial; MME: subtasks (default: all)")
        p.add_argument("--world-split", default="test", help="split of a SynthCOCO world")
        p.add_argument("--limit", type=int, default=None,
                       help="the first N items of each POPE split or MME subtask (CHAIR: of "
                            "all); default: every item")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--device", default=None)
        add_backend_args(p)
        p.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) malformed data lines instead of stopping")
        add_decoding_args(p, seed_help="run seed: each item's seed derives from it and the "
                          "item's id (recorded per sample); default 0")
        p.set_defaults(max_new_tokens=None)
        if name == "pope":
            p.add_argument("--parser", default=None, help="answer parser: pope (default), opera")
            p.add_argument("--prompt-suffix", default=None,
                           help=f"appended to each question (default {POPE_SUFFIX!r})")
        if name == "chair":
            p.add_argument("--num-images", type=int, default=None, help="default 500")
            p.add_argument("--image-seed", type=int, default=0,
                           help="seed of the image selection (not of decoding)")
            p.add_argument("--image-ids", default=None, help="file of image ids (JSON or lines)")
            p.add_argument("--prompt", default=None, help=f"default {CHAIR_PROMPT!r}")
            p.add_argument("--drop-incomplete-sentence", action="store_true")
            p.add_argument("--no-double-space-quirk", action="store_true")
            p.add_argument("--singularizer", default="pattern",
                           help="singular forms: pattern (default, the reference's), "
                                "wordnet-noun (OPERA's), inflect")
        p.set_defaults(func=lambda a: evaluate(None, config_from_args(a)) is not None and 0)
    cmp_ = sub.add_parser("compare", help="result folders side by side: per benchmark, a "
                          "table with bootstrap intervals and a bar chart")
    cmp_.add_argument("dirs", nargs="+", help="folders written by veridical eval (any mix of "
                      "benchmarks: one section each)")
    cmp_.add_argument("--png", default="compare.png", metavar="PATH",
                      help="where the bar chart is written (default: %(default)s in the current "
                           "folder; with several benchmarks one chart each, named like "
                           "compare-pope.png; '' for none)")
    cmp_.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                      help="bootstrap draws for 95%% CIs over images and paired differences to "
                           "each benchmark's first run (default: %(default)s; 0 = none)")
    cmp_.set_defaults(func=lambda a: print(compare(a.dirs, a.png or None, a.bootstrap)) or 0)
