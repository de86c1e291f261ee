"""``python -m veridical.server [flags]``: the same as ``veridical serve [flags]``."""

import sys

from veridical.cli import standalone

from .cli import add_subcommands


def main(argv: list[str] | None = None) -> int:
    flags = sys.argv[1:] if argv is None else argv
    return standalone(add_subcommands, ["serve", *flags], prog="python -m veridical.server",
                      verbose=True)


if __name__ == "__main__":
    sys.exit(main())
