"""Beam search: transformers' candidate selection, length penalty and early-stopping heuristic,
per request, over batched rows (every branch's cache rows follow the beams), with finished
requests leaving the batch. :class:`Beams` is the bookkeeping (also OPERA's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DecodingConfig
from .context import MethodContext
from .method import Method
from .state import BatchState, row_index


@dataclass
class Beams:
    """transformers' beam-search bookkeeping for ``b`` requests of ``nb`` beams each: running
    beams (tokens and summed log-probs) and the finished hypotheses (length-penalised)."""

    running: torch.Tensor  # (b, nb, t) generated tokens of the running beams
    scores: torch.Tensor  # (b, nb) summed log-probs of the running beams
    done_seqs: list[list[list[int]]]  # (b, nb) finished hypotheses
    done_scores: torch.Tensor  # (b, nb)
    done_flags: torch.Tensor  # (b, nb) bool: slot holds a real hypothesis
    improvable: torch.Tensor  # (b,) bool

    @classmethod
    def start(cls, b: int, nb: int) -> Beams:
        scores = torch.full((b, nb), -1e9)
        scores[:, 0] = 0.0  # only the first beam's candidates count at the first step
        return cls(torch.zeros(b, nb, 0, dtype=torch.long), scores,
                   [[[] for _ in range(nb)] for _ in range(b)], torch.full((b, nb), -1e9),
                   torch.zeros(b, nb, dtype=torch.bool), torch.ones(b, dtype=torch.bool))

    def take(self, keep: torch.Tensor) -> Beams:
        """The requests ``keep`` (a copy: later steps never change it)."""
        return Beams(self.running[keep], self.scores[keep],
                     [[list(h) for h in self.done_seqs[i]] for i in keep.tolist()],
                     self.done_scores[keep], self.done_flags[keep], self.improvable[keep])

    def advance(self, ctx: MethodContext, log_probs: torch.Tensor, step: int,
                config: DecodingConfig) -> tuple[torch.Tensor, torch.Tensor, list[tuple | None]]:
        """One step from next-token log-probs (b * nb, V) of every running beam.

        Returns ``parent`` (b, nb): the beam each new running beam continues, ``complete`` (b,)
        bool, and per request its best hypothesis ``(ids, reason)`` when complete, else None.
        The new tokens are ``self.running[:, :, -1]``."""
        b, nb = self.scores.shape
        lp, max_new = config.length_penalty, config.max_new_tokens
        keep_k = max(2, 1 + len(ctx.eos_ids)) * nb  # candidates kept per request and step
        top_nb = torch.arange(keep_k) < nb
        eos = torch.tensor(ctx.eos_ids or [-1])
        vocab = log_probs.shape[-1]
        flat = (log_probs.view(b, nb, vocab) + self.scores[:, :, None]).view(b, nb * vocab)
        cand_scores, cand_index = torch.topk(flat, keep_k, dim=-1)  # (b, K)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand_seqs = torch.cat(
            [torch.gather(self.running, 1, cand_beam[:, :, None].expand(-1, -1, step)),
             cand_token[:, :, None]], dim=-1,
        )  # (b, K, step + 1)
        hits = torch.isin(cand_token, eos)
        if step + 1 >= max_new:
            hits[:] = True
        elif config.stop:
            for i in range(b):
                for k in range(keep_k):
                    if ctx.finished(cand_seqs[i, k].tolist(), config) is not None:
                        hits[i, k] = True

        # Running beams for the next step: the best candidates that did not finish.
        run_cand = cand_scores + hits.float() * -1e9
        next_idx = torch.topk(run_cand, nb, dim=-1).indices  # (b, nb)
        self.running = torch.gather(cand_seqs, 1, next_idx[:, :, None].expand(-1, -1, step + 1))
        self.scores = torch.gather(run_cand, 1, next_idx)
        parent = torch.gather(cand_beam, 1, next_idx)  # (b, nb)

        # Finished hypotheses: among the top nb candidates, scored with the length penalty.
        just_done = hits & top_nb[None, :]
        fin = cand_scores / ((step + 1) ** lp)
        full = self.done_flags.all(-1, keepdim=True) & (config.early_stopping is True)
        fin = fin + full.float() * -1e9 + (~self.improvable[:, None]).float() * -1e9
        fin = fin + (~just_done).float() * -1e9
        merged = torch.cat([self.done_scores, fin], dim=1)
        order = torch.topk(merged, nb, dim=-1).indices
        for i in range(b):
            pool = self.done_seqs[i] + [cand_seqs[i, k].tolist() for k in range(keep_k)]
            self.done_seqs[i] = [pool[j] for j in order[i].tolist()]
        self.done_scores = torch.gather(merged, 1, order)
        self.done_flags = torch.gather(torch.cat([self.done_flags, just_done], dim=1), 1, order)

        # transformers' early-stop heuristic, then which requests are complete.
        if config.early_stopping == "never" and lp > 0:
            best_len = max_new
        else:
            best_len = step + 1
        best_running = self.scores[:, 0] / (best_len**lp)
        worst_done = torch.where(self.done_flags, self.done_scores.min(-1, keepdim=True).values,
                                 -1e9)
        self.improvable = self.improvable & (best_running[:, None] > worst_done).any(-1)
        complete = ~self.improvable | hits.all(-1)
        if config.early_stopping is True:
            complete |= self.done_flags.all(-1)

        best: list[tuple | None] = [None] * b
        for i in range(b):
            if complete[i]:
                ids = self.done_seqs[i][0]
                reason = "stop" if (ids and ids[-1] in ctx.eos_ids) or (
                    config.stop and ctx.finished(ids, config) == "stop") else "length"
                best[i] = (ids, reason)
        return parent, complete, best


def beam_search(ctx: MethodContext, state: BatchState, method: Method, n_branches: int,
                 config: DecodingConfig, seeds: list[int]) -> list[tuple[list[int], str]]:
    """transformers' beam search, per request, with finished requests leaving the batch."""
    n, nb = len(seeds), config.num_beams
    logits = state.prefill()  # (nb_branches * n, V): one row per request and branch
    # Every beam of a request starts from the same prompt rows.
    expand = torch.arange(n, device=logits.device).repeat_interleave(nb)
    rows = row_index(expand, n, n_branches)
    state.select(rows)
    logits = logits[rows]

    live = list(range(n))
    beams = Beams.start(n, nb)
    best: list[tuple[list[int], str]] = [([], "length")] * n
    for step in range(config.max_new_tokens):
        b = len(live)
        scores = ctx.scores(method, logits, b * nb, state.info.names, step)
        log_probs = torch.log_softmax(scores, dim=-1).cpu()  # (b * nb, V)
        parent, complete, done = beams.advance(ctx, log_probs, step, config)
        for i in range(b):
            if done[i] is not None:
                best[live[i]] = done[i]
            elif live[i] in ctx.cancelled:  # between two steps: its best running beam so far
                complete[i] = True
                best[live[i]] = (beams.running[i, 0].tolist(), "cancelled")
        keep = (~complete).nonzero().flatten()
        if keep.numel() == 0:
            break
        # Reorder (and drop) cache rows: beam j of request i continues from its parent beam.
        parents = (keep[:, None] * nb + parent[keep]).flatten().to(logits.device)
        state.select(row_index(parents, b * nb, n_branches))
        tokens = beams.running[keep, :, -1].flatten().to(logits.device)
        beams = beams.take(keep)
        live = [live[i] for i in keep.tolist()]
        logits = state.step(tokens.repeat(n_branches))
    return best
