"""Registry of mitigation methods by name, and composition with ``+``.

``@register`` adds a :class:`~veridical.decoding.method.Method` subclass under its ``name``.
``resolve("vhr+vcd", args)`` builds the method (a :class:`Composite` when names are joined with
``+``). Arguments may be given flat (``{"alpha": 1}``, when exactly one component has that
parameter), qualified (``{"vcd.alpha": 1}``) or nested (``{"vcd": {"alpha": 1}}``). Unknown names
are answered with "did you mean" and the list of registered methods.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from veridical.errors import InputError

from .method import Branch, Method, RowInfo, combine_parts, did_you_mean

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name``."""
    if not cls.name or "+" in cls.name or "." in cls.name:
        raise ValueError(f"method name {cls.name!r} must be non-empty and contain no '+' or '.'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


@contextlib.contextmanager
def registered_for(*classes: type[Method]) -> Iterator[None]:
    """Register ``classes`` for the block only (tests, or trying a method out): outside it they
    are listed nowhere."""
    for cls in classes:
        register(cls)
    try:
        yield
    finally:
        for cls in classes:
            _REGISTRY.pop(cls.name, None)


def _load_builtin_methods() -> None:
    # One module per method in decoding/methods/; importing them runs their @register.
    global _LOADED
    if _LOADED:
        return
    from . import methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def registered() -> dict[str, type[Method]]:
    _load_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Method]:
    table = registered()
    if name not in table:
        raise ValueError(
            f"unknown method {name!r}.{did_you_mean(name, list(table))} "
            f"Available methods: {', '.join(table)}"
        )
    return table[name]


def methods() -> list[dict[str, Any]]:
    """Every registered method with its description, parameters and defaults."""
    return [cls.describe() for cls in registered().values()]


def _split_args(names: list[str], args: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in args.items():
        if key in per and isinstance(value, Mapping):
            per[key].update(value)
        elif "." in key:
            owner, param = key.split(".", 1)
            if owner not in per:
                raise ValueError(
                    f"argument {key!r} names method {owner!r}, which is not part of "
                    f"{'+'.join(names)!r}; qualify with one of: {', '.join(names)}"
                )
            per[owner][param] = value
        else:
            owners = [n for n in names if any(p.name == key for p in get(n).params)]
            if len(owners) > 1:
                raise ValueError(
                    f"parameter {key!r} belongs to several methods ({', '.join(owners)}); "
                    f"qualify it: {' or '.join(f'{o}.{key}' for o in owners)}"
                )
            if not owners:
                if len(names) == 1:  # let the method itself name the problem
                    owners = names
                else:
                    known = [f"{n}.{p.name}" for n in names for p in get(n).params]
                    raise ValueError(
                        f"no method in {'+'.join(names)!r} has a parameter {key!r}."
                        f"{did_you_mean(key, known)} Parameters: {', '.join(known) or 'none'}"
                    )
            per[owners[0]][key] = value
    return per


def resolve(spec: str | Method, args: Mapping[str, Any] | None = None) -> Method:
    """Build a method from a name such as ``"vcd"`` or ``"vhr+vcd"`` and its arguments."""
    if isinstance(spec, Method):
        if args:
            raise ValueError("method arguments were given with an already built method; pass a name")
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method must be a name such as 'none' or 'vhr+vcd', got {spec!r}")
    names = [n.strip() for n in spec.split("+")]
    if any(not n for n in names):
        raise ValueError(f"method {spec!r} has an empty part; join names like 'vhr+vcd'")
    if len(set(names)) != len(names):
        raise ValueError(f"method {spec!r} names a method twice")
    classes = [get(n) for n in names]
    per = _split_args(names, dict(args or {}))
    parts = [cls(**per[n]) for n, cls in zip(names, classes)]
    return parts[0] if len(parts) == 1 else Composite(parts)


class Composite(Method):
    """Methods joined with ``+``: the union of their branches (names prefixed by the method),
    their hooks and attention edits, and the sum of their logit deltas with one APC (see
    ``veridical.decoding.method``)."""

    name = "composite"

    def __init__(self, parts: list[Method]) -> None:
        self.parts = parts
        self.args = {f"{p.name}.{k}": v for p in parts for k, v in p.args.items()}
        self.name = "+".join(p.name for p in parts)  # type: ignore[misc]

    def branches(self) -> list[Branch]:
        out = []
        for part in self.parts:
            for branch in part.branches():
                out.append(
                    Branch(f"{part.name}.{branch.name}", make=branch.make, on_pixels=branch.on_pixels)
                )
        return out

    def prepare(self, engine, requests) -> dict:
        return {k: v for p in self.parts for k, v in p.prepare(engine, requests).items()}

    def attention_edits(self, engine) -> list:
        return [e for p in self.parts for e in p.attention_edits(engine)]

    def install(self, engine, rows: RowInfo) -> list:
        return [h for p in self.parts for h in p.install(engine, rows.scoped(p.name + "."))]

    def search(self):
        own = [(p.name, p.search()) for p in self.parts]
        own = [(name, s) for name, s in own if s is not None]
        if len(own) > 1:
            raise ValueError(f"{' and '.join(n for n, _ in own)} are both search strategies; "
                             "compose at most one of them")
        return own[0][1] if own else None

    def combine(self, logits, branch_logits, step) -> torch.Tensor:
        return combine_parts([(p.name + ".", p) for p in self.parts], logits, branch_logits, step)


def parse_method_sets(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["alpha=1", "vcd.beta=0.2"]`` -> ``{"alpha": "1", "vcd.beta": "0.2"}``: method arguments
    from ``key=value`` strings (the command line's ``--set``; methods coerce the values)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r} must look like key=value (e.g. --set alpha=1)")
        out[key.strip()] = value.strip()
    return out
