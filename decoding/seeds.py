"""Where a request's randomness comes from.

Contract: everything random about one request derives from ONE integer, its seed, and from
nothing else (not its place in a batch, the batch's size, the process, or a resume):
- sampling draws from ``torch.Generator().manual_seed(seed)``;
- each branch of a method (VCD's noise, RITUAL's transform) draws from its own generator seeded
  with ``derive_seed(seed, "branch", branch_key(name))``: the branch's own name (``"noised"``),
  the same alone and inside a composition (``vcd`` and ``vhr+vcd`` draw the same noise, so
  their results pair up), while two branches of one request never share a draw
  (``ritual+vcd``: ``"transformed"`` and ``"noised"``; a composition names each method once),
  and a branch's draw does not depend on whether the request samples.

``seed=None`` asks for fresh randomness: :func:`fresh_seed` draws one from the operating system,
and the seed used is returned with the result so the request can be replayed. An evaluation run
has one run seed; each item's seed is ``derive_seed(run_seed, "item", item_id)``, so items differ
from one another and an item's output is the same at any batch size or process count.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence

from veridical.errors import InputError

from .config import is_int

SEED_BITS = 63  # seeds are non-negative and fit torch.Generator.manual_seed and an int64


def fresh_seed() -> int:
    """A new seed from the operating system's randomness."""
    return secrets.randbits(SEED_BITS)


def derive_seed(seed: int, *key: str | int) -> int:
    """A seed for ``key`` (e.g. ``"item", "random/17"``) under ``seed``: stable across runs,
    machines and Python versions (a hash, not Python's salted ``hash``), and different for
    different keys."""
    text = json.dumps([seed, *key], separators=(",", ":"))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def branch_key(name: str) -> str:
    """A branch's own name: ``"noised"`` for ``vcd``'s branch, also when a composition calls it
    ``"vcd.noised"``."""
    return name.rsplit(".", 1)[-1]


def request_seeds(seed: int | Sequence[int | None] | None, n: int) -> list[int]:
    """One seed per request: ``seed`` given for every request, one per request (None entries
    fresh), or None (all fresh)."""
    if seed is None:
        return [fresh_seed() for _ in range(n)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != n or not all(s is None or is_int(s) for s in seed):
            raise InputError(f"seed must be one integer or {n} integers (one per request)")
        return [fresh_seed() if s is None else s for s in seed]
    if not is_int(seed):
        raise InputError(f"seed={seed!r} must be an integer")
    return [seed] * n
