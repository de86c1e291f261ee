"""Greedy decoding and sampling, as a generator of token events.

Contract: :func:`decode` prefills a :class:`~.state.BatchState`, then per step scores every live
slot (the method's combination of its branch rows, at the slot's own decode step), picks a token
per slot (argmax, or a draw from the request's own ``torch.Generator`` seeded with its seed) and
yields a :class:`~.config.TokenEvent` per slot, then a :class:`Finished` for each request that
ended (EOS unless ignored, a stop string, its length, or a cancellation). Finished requests leave
the batch (their cache rows are dropped). A request whose index is put into ``cancelled`` while
its token event is out ends right there with reason ``"cancelled"``.

Joining (continuous batching): before each step ``join(n_live)`` may return newcomers' unprefilled
rows and their seeds; they are prefilled in a forward of their own and merged into the running
batch, and from then on share every step, each at its own decode step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import DecodingConfig, TokenEvent, TokenLogprob
from .context import MethodContext
from .method import Method
from .sampling import sample, warp
from .state import BatchState, row_index

# (live requests) -> (the newcomers' unprefilled state, their seeds), or None
Join = Callable[[int], "tuple[BatchState, list[int]] | None"]


@dataclass(frozen=True)
class Finished:
    """A request's raw outcome, as a search knows it (the engine makes the result)."""

    request: int
    token_ids: list[int]
    reason: str  # "stop", "length" or "cancelled"
    logprobs: list[TokenLogprob] | None = None  # with DecodingConfig.logprobs


def token_logprobs(scores: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability under ``scores`` and its top ``k``; tokens the
    scores rule out (-inf: APC's cut, a banned EOS) are left out of the top, which may then
    hold fewer than ``k``."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None])[:, 0].tolist()
    top_v, top_i = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [TokenLogprob(int(t), p, tuple((a, b) for a, b in zip(i, v) if math.isfinite(b)))
            for t, p, i, v in zip(chosen.tolist(), picked, top_i.tolist(), top_v.tolist())]


def decode(ctx: MethodContext, state: BatchState, method: Method, n_branches: int,
           config: DecodingConfig, seeds: list[int], join: Join | None = None,
           cancelled: set[int] | None = None) -> Iterator[TokenEvent | Finished]:
    """See the module docstring. Request indices: the given ones, then newcomers in order."""
    cancelled = cancelled if cancelled is not None else set()
    generators: list[torch.Generator] = []  # one per request, from its seed
    tokens_of: list[list[int]] = []
    logprobs_of: list[list[TokenLogprob]] = []

    def add(new_seeds: list[int]) -> list[int]:
        """Book-keeping for new requests; their indices."""
        first = len(tokens_of)
        for seed in new_seeds:
            generators.append(torch.Generator().manual_seed(seed))
            tokens_of.append([])
            logprobs_of.append([])
        return list(range(first, len(tokens_of)))

    live = add(seeds)  # request of each slot
    steps = [0] * len(live)  # each slot's decode step (newcomers start at 0)
    logits = state.prefill()
    joinable = join is not None and state.can_extend()
    while True:
        joined = join(len(live)) if joinable else None
        if joined is not None:
            new_state, new_seeds = joined
            new_logits = new_state.prefill()
            ids = add(new_seeds)
            if live:
                logits = state.extend(new_state, logits, new_logits)
            else:  # the batch had drained: the newcomers go on alone
                state, logits = new_state, new_logits
            live, steps = live + ids, steps + [0] * len(ids)
        if not live:
            return
        scores = slot_scores(ctx, method, logits, steps, state.info.names)
        if config.do_sample:
            warped = warp(scores, config.temperature, config.top_k, config.top_p)
            chosen = sample(warped, [generators[r] for r in live])
        else:
            chosen = scores.argmax(dim=-1)
        entries: list[TokenLogprob | None] = [None] * len(live)
        if config.logprobs is not None:
            entries = token_logprobs(scores, chosen, config.logprobs)
        keep = []
        for slot, (request, token) in enumerate(zip(live, chosen.tolist())):
            tokens_of[request].append(token)
            if entries[slot] is not None:
                logprobs_of[request].append(entries[slot])
            yield TokenEvent(request, token, entries[slot])
            reason = ctx.finished(tokens_of[request], config)
            if request in cancelled:
                reason = reason or "cancelled"
            if reason is None:
                keep.append(slot)
                continue
            yield Finished(request, tokens_of[request], reason,
                           logprobs_of[request] if config.logprobs is not None else None)
        if not keep:  # every row finished: newcomers (if any) start afresh
            live, steps = [], []
            continue
        if len(keep) < len(live):
            index = torch.tensor(keep, device=chosen.device)
            state.select(row_index(index, len(live), n_branches))
            chosen = chosen[index]
            live, steps = [live[s] for s in keep], [steps[s] for s in keep]
        logits = state.step(chosen.repeat(n_branches))
        steps = [step + 1 for step in steps]


def slot_scores(ctx: MethodContext, method: Method, logits: torch.Tensor, steps: list[int],
                names: list[str]) -> torch.Tensor:
    """Scores (S, V) of every slot; slots at different decode steps (requests that joined a
    running batch) are scored per step, so a method's per-step rule sees each one's own."""
    if len(set(steps)) == 1:
        return ctx.scores(method, logits, len(steps), names, steps[0])
    scores = None
    for step in sorted(set(steps)):
        slots = torch.tensor([s for s, t in enumerate(steps) if t == step], device=logits.device)
        rows = row_index(slots, len(steps), len(names))
        part = ctx.scores(method, logits[rows], len(slots), names, step)
        if scores is None:
            scores = part.new_empty(len(steps), part.shape[-1])
        scores[slots] = part
    return scores
