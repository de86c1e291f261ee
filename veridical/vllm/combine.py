"""The batch-level vLLM logits processor that runs the contrastive family as groups of requests.

A veridical request on vLLM is a GROUP of vLLM requests: the real input (role 0) and one request
per branch of its method (roles 1..n, in ``method.branches()`` order), tied by the tag
``SamplingParams.extra_args["veridical"]``::

    {"group": key, "role": r, "size": n + 1, "method": name, "args": {...}, "offset": k,
     "seed": s, "sample": [temperature, top_k, top_p] or None, "logprobs": k or None}

At each step :meth:`Combiner.apply` finds every group whose members are ALL in the batch, and for
each bucket of groups with the same method and decode step (``offset`` + tokens so far) computes,
in one vectorised call, the method's scores from the members' logits
(``method.combine(z, {branch: z_branch}, step)``: the engine's own code), chooses ONE token per
group (argmax, or a draw from the group's generator with the engine's ``warp``/``sample``), and
makes every member's row one-hot on it, so all members append the same token (vLLM runs them
greedy). A group with a member missing from the batch is left alone: the backend sees the members'
token counts part and rolls the group back (veridical/vllm/backend.py). The draws of a sampled
group depend only on its seed and step (a generator is replayed to the step when needed), so a
rolled-back or resubmitted group draws what the engine draws.

Logprobs of the combined scores (vLLM's own are computed before logits processors) are left in
``SIDE[group][step]`` for the backend, which runs the engine core in its own process.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from veridical.decoding.greedy import token_logprobs
from veridical.decoding.registry import resolve
from veridical.decoding.sampling import sample, warp

TAG = "veridical"
FIELDS = ("group", "role", "size", "method", "args", "offset", "seed", "sample", "logprobs")
# group -> step -> TokenLogprob of the chosen token under the combined scores
SIDE: dict[str, dict[int, Any]] = defaultdict(dict)


@dataclass
class _Member:
    tag: dict
    out: list[int]  # vLLM's live list of this request's output tokens

    @property
    def group(self) -> str:
        return self.tag["group"]


def tag_of(params: Any) -> dict | None:
    """The veridical tag of a request's SamplingParams, or None for a plain vLLM request."""
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(TAG)


class Combiner(LogitsProcessor):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.members: dict[int, _Member] = {}
        self.methods: dict[str, tuple[Any, list[str]]] = {}
        self.generators: dict[str, tuple[torch.Generator, int]] = {}

    @classmethod
    def validate_params(cls, params: Any) -> None:
        tag = tag_of(params)
        if tag is None:
            return
        missing = [f for f in FIELDS if f not in tag]
        if missing:
            raise ValueError(f"extra_args['veridical'] lacks {', '.join(missing)}")
        resolve(tag["method"], tag["args"])  # a clear ValueError for a bad method

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.members.pop(index, None)
        for index, params, _prompt, out in batch_update.added:
            tag = tag_of(params)
            if tag is None:
                self.members.pop(index, None)
            else:
                self.members[index] = _Member(tag, out)
        for a, b, direction in batch_update.moved:
            first, second = self.members.pop(a, None), self.members.pop(b, None)
            if first is not None:
                self.members[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.members[a] = second
        live = {m.group for m in self.members.values()}
        for group in [g for g in self.generators if g not in live]:
            del self.generators[group]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.members:
            return logits
        rows_of: dict[str, list[int | None]] = {}
        for row, member in self.members.items():
            slots = rows_of.setdefault(member.group, [None] * member.tag["size"])
            slots[member.tag["role"]] = row
        buckets: dict[tuple, list[list[int]]] = defaultdict(list)
        for rows in rows_of.values():
            if None in rows:
                continue  # a member is not in this step: the backend rolls the group back
            tag = self.members[rows[0]].tag
            step = tag["offset"] + len(self.members[rows[0]].out)
            sampling = tuple(tag["sample"]) if tag["sample"] else None
            buckets[(self._method_key(tag), step, sampling)].append(rows)
        for (key, step, sampling), groups in buckets.items():
            self._combine(logits, key, step, sampling, groups)
        return logits

    # ---------------------------------------------------------------------------------------------
    def _method_key(self, tag: dict) -> str:
        key = repr((tag["method"], sorted(tag["args"].items())))
        if key not in self.methods:
            method = resolve(tag["method"], tag["args"])
            self.methods[key] = (method, [b.name for b in method.branches()])
        return key

    def _combine(self, logits: torch.Tensor, key: str, step: int, sampling: tuple | None,
                 groups: list[list[int]]) -> None:
        method, names = self.methods[key]
        index = torch.tensor(groups, device=logits.device).T  # (size, G): role-major
        z = logits[index[0]]
        branches = {name: logits[index[r + 1]] for r, name in enumerate(names)}
        scores = method.combine(z, branches, step)
        tags = [self.members[rows[0]].tag for rows in groups]
        if sampling is None:
            chosen = scores.argmax(dim=-1)
        else:
            temperature, top_k, top_p = sampling
            warped = warp(scores, temperature, top_k, top_p)
            chosen = sample(warped, [self._generator(t, step) for t in tags])
        wanted = [t["logprobs"] for t in tags]
        if any(k is not None for k in wanted):
            entries = token_logprobs(scores, chosen, max(k or 0 for k in wanted))
            for tag, k, entry in zip(tags, wanted, entries):
                if k is not None:
                    SIDE[tag["group"]][step] = replace(entry, top=entry.top[:k])
        flat = index.reshape(-1)
        logits[flat] = float("-inf")
        logits[flat, chosen.to(logits.device).repeat(index.shape[0])] = 0.0

    def _generator(self, tag: dict, step: int) -> torch.Generator:
        """The group's sampling generator, positioned after ``step`` draws (one per step, as the
        engine's ``sample``); replayed from the seed when a step was discarded or resubmitted."""
        gen, drawn = self.generators.get(tag["group"], (None, -1))
        if gen is None or drawn != step:
            gen = torch.Generator().manual_seed(tag["seed"])
            for _ in range(step):
                torch.rand((), generator=gen, dtype=torch.float64)
        self.generators[tag["group"]] = (gen, step + 1)
        return gen
