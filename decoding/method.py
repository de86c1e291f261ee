"""The method interface: every mitigation is a point on three independent axes.

1. Branches: extra inputs that run beside the real one (a noised image, no image, a disturbed
   instruction, weak MoE routing, ...). A :class:`Branch` turns a request into the branch's
   request; the engine runs all branches of all requests in ONE batched forward per step, each
   with its own cache rows, and feeds every branch the tokens chosen for its request. Forward-time
   changes (e.g. routing) are installed as hooks by :meth:`Method.install`, which reads which
   rows belong to which branch from a :class:`RowInfo`.
2. Attention edits: what changes inside attention (registered through transformers'
   ``AttentionInterface``; see the attention family).
3. Logits combination and search: each method adds a ``delta`` to the real branch's logits
   ``z`` (a contrast such as ``alpha * (z - z_noised)``) and may ask for the adaptive
   plausibility constraint (APC: keep tokens with ``z >= log(beta) + max z``, on the real
   branch's raw logits; a token exactly at the cutoff is kept, so ``beta = 1`` keeps only the
   max). Composed methods add their deltas and apply APC once with the largest beta, so
   ``ritual+vcd`` is ``z + a_pos * z_T + a * (z - z_noised)`` as the RITUAL paper combines them
   (its reference code cannot run RITUAL and VCD together, so this follows the paper only).
   The search (greedy, sampling, beam, ...) then picks from the scores.

Deltas written on the logit scale equal their log-probability forms up to a per-row constant,
which changes neither softmax nor argmax, so PAI's and M3ID's log-prob formulas are exact here.

A method declares its parameters as :class:`Param` objects; ``Method(**args)`` validates every
argument and raises ``ValueError`` naming the method, the parameter, the value and the allowed range.
Nothing here modifies its input tensors in place.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, type and allowed range (inclusive unless stated)."""

    name: str
    default: Any
    doc: str = ""
    type: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the value must be strictly above `low`
    choices: tuple | None = None

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{self.name} {'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{self.name} <= {self.high:g}")
        return " and ".join(parts) if parts else f"any {self.type.__name__}"

    def validate(self, method: str, value: Any) -> Any:
        """Coerce ``value`` to the parameter's type and check its range; return the clean value."""
        where = f"method {method!r}: parameter {self.name!r}"
        value = _coerce(value, self.type, where)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} = {value!r} is not allowed; use {self.range_text()}")
        if self.type in (int, float):
            bad = isinstance(value, float) and not math.isfinite(value)
            if self.low is not None:
                bad |= value <= self.low if self.low_open else value < self.low
            if self.high is not None:
                bad |= value > self.high
            if bad:
                raise ValueError(
                    f"{where} = {value!r} is out of range; allowed: {self.range_text()} "
                    f"(default {self.default!r})"
                )
        return value

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "default": self.default,
            "type": self.type.__name__,
            "range": self.range_text(),
            "doc": self.doc,
        }


def _coerce(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where} = {value!r} is not a boolean; use true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where} = {value!r} must be a number, not a boolean")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} = {value!r} is not a number") from None
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"{where} = {value!r} must be a whole number")
            return int(number)
        return number
    if kind is str:
        return str(value)
    return value


def did_you_mean(name: str, options: list[str]) -> str:
    """' Did you mean X?' when ``name`` is close to one of ``options``, else ''."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass
class Request:
    """One decoding request as a branch sees it: an image (or None) and the user's text."""

    image: Any  # PIL.Image.Image | None
    prompt: str
    system: str | None = None  # a system message (ICD's disturbance role); None: the template's
    # Free-form per-request settings a branch may add (e.g. a tensor transform for the pixels).
    extras: dict[str, Any] = field(default_factory=dict)
    # This request's own token limit, below the call's DecodingConfig.max_new_tokens (None: the
    # call's): greedy decoding and sampling end its row there (decoding/engine.py).
    max_new_tokens: int | None = None


def _same_request(request: Request, rng: torch.Generator) -> Request:
    return request


@dataclass(frozen=True)
class Branch:
    """An extra input that runs beside the real one.

    ``make`` maps the real request to the branch's request (PIL image / prompt level, with a
    per-request ``torch.Generator`` for random transforms). ``on_pixels`` optionally transforms the
    processed pixel tensor (VCD distorts the *normalised* tensor). ``name`` must be unique within
    a (possibly composed) method.
    """

    name: str
    make: Callable[[Request, torch.Generator], Request] = _same_request
    on_pixels: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


@dataclass
class RowInfo:
    """Which cache rows belong to which branch, for hooks that act on some rows only.

    Rows are branch-major: with ``n_slots`` live sequences, branch ``b`` (``names[0]`` is the real
    input, ``"main"``) owns rows ``b * n_slots ... (b + 1) * n_slots - 1``. The engine keeps
    ``n_slots`` current as sequences finish or beams reorder.
    """

    names: list[str]
    n_slots: int

    def mask(self, name: str) -> torch.Tensor:
        """(R,) bool: the rows of branch ``name``."""
        flags = torch.tensor([n == name for n in self.names])
        return flags.repeat_interleave(self.n_slots)

    def scoped(self, prefix: str) -> ScopedRows:
        return ScopedRows(self, prefix)


@dataclass
class ScopedRows:
    """A composed method's part sees its own branch names, without the ``part.`` prefix."""

    parent: RowInfo
    prefix: str

    def mask(self, name: str) -> torch.Tensor:
        return self.parent.mask(self.prefix + name)

    def scoped(self, prefix: str) -> ScopedRows:
        return ScopedRows(self.parent, self.prefix + prefix)


def apc(scores: torch.Tensor, raw: torch.Tensor, beta: float) -> torch.Tensor:
    """Adaptive plausibility constraint: ``scores`` where ``raw >= log(beta) + max(raw)`` (per
    row), -inf elsewhere. A token exactly at the cutoff is kept, so ``beta = 1`` keeps the max
    (and its ties) only; ``beta = 0`` keeps every token."""
    if beta <= 0:
        return scores
    cutoff = math.log(beta) + raw.max(dim=-1, keepdim=True).values
    return scores.masked_fill(raw < cutoff, float("-inf"))


class Method:
    """Base class: the baseline behaviour on every axis. Subclasses override what they change."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **args: Any) -> None:
        known = {p.name: p for p in self.params}
        for key in args:
            if key not in known:
                listing = ", ".join(known) if known else "none"
                raise ValueError(
                    f"method {self.name!r} has no parameter {key!r}.{did_you_mean(key, list(known))}"
                    f" Its parameters: {listing}"
                )
        self.args: dict[str, Any] = {
            p.name: p.validate(self.name, args[p.name]) if p.name in args else p.default
            for p in self.params
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"{type(self).__name__}({inner})"

    # Axis 1: branches -------------------------------------------------------------------------
    def branches(self) -> list[Branch]:
        return []

    def install(self, engine: Any, rows: RowInfo) -> list[Any]:
        """Install forward hooks for this generation; return handles with ``.remove()``."""
        return []

    def prepare(self, engine: Any, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Per-request state computed once before decoding (e.g. VHR's head selection), as
        tensors (n_requests, ...); the engine keeps them aligned with the rows as sequences
        finish or beams reorder, and attention edits read them through ``EditPlan.data``.
        Names must be unique across methods (prefix them with the method's name)."""
        return {}

    # Axis 2: attention edits ------------------------------------------------------------------
    def attention_edits(self, engine: Any) -> list[Any]:
        """``veridical.decoding.attention.AttentionEdit`` objects for this generation, applied
        to the real-input rows (extra branches run unedited)."""
        return []

    # Axis 3: logits combination ---------------------------------------------------------------
    def delta(
        self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor], step: int
    ) -> torch.Tensor | None:
        """What this method adds to the real branch's ``logits`` (N, V), given each extra
        branch's logits (N, V) at decode ``step`` (0 for the first generated token); None for
        nothing. Pure: never edits its inputs in place."""
        return None

    def plausibility(self) -> float | None:
        """The APC beta this method asks for, or None."""
        return None

    def combine(
        self, logits: torch.Tensor, branch_logits: Mapping[str, torch.Tensor], step: int
    ) -> torch.Tensor:
        """Next-token scores (N, V): ``logits`` plus every delta, then APC on ``logits``."""
        return combine_parts([("", self)], logits, branch_logits, step)

    # Search -----------------------------------------------------------------------------------
    def search(self) -> Callable | None:
        """A search strategy replacing greedy/sampling/beam search (OPERA), called as
        ``search(engine, rows, method, n_branches, config, seeds)``; None for the usual ones."""
        return None

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "description": cls.description,
            "params": [p.describe() for p in cls.params],
        }


def combine_parts(
    parts: list[tuple[str, Method]],
    logits: torch.Tensor,
    branch_logits: Mapping[str, torch.Tensor],
    step: int,
) -> torch.Tensor:
    """Sum the deltas of (prefix, method) parts on ``logits``; APC once with the largest beta."""
    scores = logits
    betas = []
    for prefix, part in parts:
        own = {k[len(prefix) :]: v for k, v in branch_logits.items() if k.startswith(prefix)}
        extra = part.delta(logits, own, step)
        if extra is not None:
            scores = scores + extra
        beta = part.plausibility()
        if beta is not None:
            betas.append(beta)
    return apc(scores, logits, max(betas)) if betas else scores
