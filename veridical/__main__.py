"""``python -m veridical ...`` (and ``accelerate launch -m veridical eval ...``) = the CLI."""

import sys

from .cli import main

sys.exit(main())
