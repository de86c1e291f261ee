"""``veridical score {pope,chair,mme}``: score answers produced by any tool, like the references.

``add_subcommands(subparsers)`` registers ``score`` on the main ``veridical`` parser; each
subcommand prints its metrics as a table, or as JSON with ``--json``. Errors in the data exit
with status 2 and one line naming the file, the line and the fix.

Accepted files
    ``score pope --questions Q [Q ...] --answers A [A ...] [--parser pope|opera]``
        Q: an official POPE question file (JSON lines or a JSON array of ``{"question_id",
        "image", "text", "label"}``) or an lmms-lab POPE ``.parquet``. A: JSON lines, one per
        answer, ``{"question_id": 1, "text": "Yes, there is a dog."}`` (LLaVA ``model_vqa``
        output and this package's runner; ``"answer"`` is accepted for ``"text"``). Without any
        ``question_id`` the answers are matched by line order, as POPE's ``evaluate.py`` does.
        Several question files are paired in order with as many answer files; the split of each
        is its ``category`` field or the random/popular/adversarial word in its file name.
    ``score chair --captions C --annotations DIR [--image-ids FILE]``
        C: JSON lines (or a JSON array) of ``{"image_id": 42, "caption": "..."}`` (OPERA's
        output format). DIR: the COCO folder with ``instances_val2014.json`` and
        ``captions_val2014.json`` (and the train2014 pair if captions use train images).
        FILE: image ids to score (JSON array or one per line), e.g. the released 500.
    ``score mme --results DIR``
        DIR: the official result files, ``{subtask}.txt`` with lines
        ``image<TAB>question<TAB>Yes|No<TAB>response`` (what ``eval_tool/calculation.py`` reads).

``--skip-bad-lines`` skips malformed lines (and, for CHAIR, captions of images missing from the
annotations; for POPE, unanswered questions) and reports how many; without it they are errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=2, default=str))


# --------------------------------------------------------------------------- pope


def cmd_pope(args: argparse.Namespace) -> int:
    from . import pope

    result = pope.score_files(args.questions, args.answers, parser=args.parser,
                              skip_bad_lines=args.skip_bad_lines)
    if args.json:
        _print_json(result)
        return 0
    table = Table(title=f"POPE (parser: {result['parser']}), values in %")
    for col in ("split", "questions", "accuracy", "precision", "recall", "f1", "yes ratio"):
        table.add_column(col, justify="left" if col == "split" else "right")
    rows = list(result["splits"].items()) + [("overall", result["overall"])]
    for name, m in rows:
        table.add_row(name, str(m["n"]), *(_pct(m[k]) for k in pope.METRICS))
    if "mean" in result:
        table.add_row("mean of splits", "", *(_pct(result["mean"][k]) for k in pope.METRICS))
    console = Console()
    console.print(table)
    if result["skipped_lines"] or result["unanswered"]:
        console.print(f"skipped {result['skipped_lines']} malformed lines, "
                      f"{result['unanswered']} unanswered questions (not scored)")
    return 0


# --------------------------------------------------------------------------- chair


def cmd_chair(args: argparse.Namespace) -> int:
    from . import chair

    ids = chair.read_image_ids(args.image_ids) if args.image_ids else None
    result = chair.score_files(args.captions, args.annotations, image_ids=ids,
                               singularizer=args.singularizer,
                               double_space_quirk=not args.no_double_space_quirk,
                               drop_incomplete=args.drop_incomplete_sentence,
                               skip_bad_lines=args.skip_bad_lines)
    if args.per_caption:
        with open(args.per_caption, "w", encoding="utf-8") as f:
            for item in result["captions"]:
                f.write(json.dumps(item) + "\n")
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "captions"})
        return 0
    m, s = result["metrics"], result["settings"]
    table = Table(title="CHAIR (lower CHAIR is better)")
    for col in ("captions", "CHAIR_s %", "CHAIR_i %", "recall %", "length (words)", "mentions"):
        table.add_column(col, justify="right")
    table.add_row(str(m["captions"]), _pct(m["chair_s"]), _pct(m["chair_i"]), _pct(m["recall"]),
                  f"{m['length']:.2f}", str(m["mentions"]))
    console = Console()
    console.print(table)
    console.print(f"singularizer={s['singularizer']} double_space_quirk={s['double_space_quirk']} "
                  f"drop_incomplete_sentence={s['drop_incomplete_sentence']}")
    if result["skipped_lines"] or result["missing_images"]:
        console.print(f"skipped {result['skipped_lines']} malformed lines and "
                      f"{result['missing_images']} captions of images missing from the annotations")
    return 0


# --------------------------------------------------------------------------- mme


def cmd_mme(args: argparse.Namespace) -> int:
    from . import mme

    result = mme.score_results_dir(args.results)
    if args.json:
        _print_json(result)
        return 0
    table = Table(title="MME (score = 100*acc + 100*acc+, max 200 per subtask)")
    for col in ("subtask", "questions", "acc %", "acc+ %", "score", "other"):
        table.add_column(col, justify="left" if col == "subtask" else "right")
    for name, m in result["subtasks"].items():
        table.add_row(name, str(m["questions"]), _pct(m["acc"]), _pct(m["acc_plus"]),
                      f"{m['score']:.2f}", str(m["other"]))
    for total, top in (("perception", 2000), ("cognition", 800), ("hallucination", 800)):
        value = result[total]
        table.add_row(f"{total} (max {top})", "", "", "",
                      "-" if value is None else f"{value:.2f}", "")
    console = Console()
    console.print(table)
    if result["missing"]:
        console.print(f"missing result files (totals that need them show '-'): "
                      f"{', '.join(result['missing'])}")
    if result["ignored"]:
        console.print(f"ignored files (not MME subtask names): {', '.join(result['ignored'])}")
    return 0


# --------------------------------------------------------------------------- wiring


def add_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``score {pope,chair,mme}`` on the main parser's subparsers."""
    from .chair import available_singularizers
    from .pope import available_parsers

    score = subparsers.add_parser("score", help="score answers/captions from any tool "
                                                "(POPE, CHAIR, MME) like the reference scripts")
    sub = score.add_subparsers(dest="benchmark", required=True)

    p = sub.add_parser("pope", help="POPE accuracy, precision, recall, F1, yes ratio")
    p.add_argument("--questions", nargs="+", required=True, metavar="FILE",
                   help="POPE question file(s): JSON lines, JSON array or lmms-lab .parquet")
    p.add_argument("--answers", nargs="+", required=True, metavar="FILE",
                   help="answer file(s), JSON lines with question_id + text; one per question file")
    p.add_argument("--parser", default="pope",
                   help=f"answer parser: {', '.join(available_parsers())} (default: pope, the official)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines and unanswered questions")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_pope)

    c = sub.add_parser("chair", help="CHAIR_s, CHAIR_i, recall, length of image captions")
    c.add_argument("--captions", required=True, metavar="FILE",
                   help="JSON lines of {image_id, caption}")
    c.add_argument("--annotations", required=True, metavar="DIR",
                   help="COCO folder with instances_val2014.json and captions_val2014.json")
    c.add_argument("--image-ids", metavar="FILE",
                   help="only these image ids (JSON array or one per line), each must be captioned")
    c.add_argument("--singularizer", default="pattern",
                   help=f"singular-form variant: {', '.join(available_singularizers())} "
                        "(default: pattern, the original CHAIR)")
    c.add_argument("--no-double-space-quirk", action="store_true",
                   help="let 'motor bike' and 'cheesecake' match (the reference never matches them)")
    c.add_argument("--drop-incomplete-sentence", action="store_true",
                   help="cut each caption after its last '.' (the 64-token protocol)")
    c.add_argument("--per-caption", metavar="FILE",
                   help="write per-caption mentions / hallucinated / covered objects (JSON lines)")
    c.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines and captions of unknown images")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_chair)

    m = sub.add_parser("mme", help="MME acc, acc+, scores, perception/cognition/hallucination")
    m.add_argument("--results", required=True, metavar="DIR",
                   help="folder of official result files {subtask}.txt")
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.set_defaults(func=cmd_mme)
    return score


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m veridical.evals.score_cli score ...``)."""
    from veridical.cli import standalone

    return standalone(add_subcommands, argv)


if __name__ == "__main__":
    sys.exit(main())
