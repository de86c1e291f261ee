"""OPERA's search: over-trust penalty and retrospection-allocation beam search, batched.

Contract (shikiw/OPERA ``opera_decoding``):
- Beam search in which each beam may only continue with its top ``k`` candidate tokens. All
  candidates of all beams of all requests are fed side by side in ONE forward per step
  (``BatchState.step_tree``: each candidate sees its beam's cache and itself), so no forward runs per
  candidate; the chosen candidate's keys and values are kept (``BatchState.commit``) and its logits
  are the next step's, so OPERA costs one forward per generated token, as beam search does
  (plus one when a beam continues with a filler, below).
- For each candidate: its attention row from the LAST layer (max over heads, post-softmax,
  renormalised to sum 1) over the response so far and itself; with the earlier response rows it
  forms the lower-triangular window ``A`` (response tokens only: column 0 is the first response
  token). Column score ``1e-7 * prod_{i >= j} (scale * A[i, j])``; over-trust score = the max
  over columns, at column ``loc``. The candidate's raw logit loses
  ``penalty_weights * score``; while it decides one of the first 10 response tokens (tokens
  0-9) it instead gains ``penalty_weights`` x its attention mass on image tokens. Beams then
  score candidates by ``log_softmax`` over the vocabulary with every other token (a "filler")
  at -999 (the reference), and transformers' beam bookkeeping (``beam.Beams``) picks.
- Scores are kept as logs (float64): ``log(1e-7) + sum_{i >= j} (log(scale) + log(A[i, j]))``,
  so no product overflows or underflows; ``loc`` is the argmax of the log-scores, i.e. of the
  exact scores. The penalty is ``exp(log(penalty_weights) + max log-score)`` rounded to float32:
  the reference's ``penalty_weights * score`` wherever that is finite in float32, and float32's
  largest value (about 3.4e38) where it is larger. So every penalty is finite and ranks the
  candidates as the exact one does, except that candidates whose exact penalty exceeds 3.4e38
  tie among themselves (at about -3.4e38, below every less penalised candidate). Like the exact
  values, they rank below the -999 fillers, of which every beam has ``V - k``, so they are never
  chosen and the cap changes no choice. The reference instead computes in its model's float16:
  its column scores underflow to 0 in most columns (40-95% in the audit), where its ``loc`` is
  the first of the tied columns, and overflow to inf elsewhere, where the candidate's logit
  becomes -inf.
- A beam may continue with a filler: when all its parent's candidates are -inf or penalised
  below -999, or when the candidates are too few for the beams (``k`` < beams at the first
  step, where only the first beam counts; ``opera_fast`` when a candidate is EOS). A filler's
  keys and values were not computed side by side, so the request then feeds every beam's chosen
  token in one more forward (a one-token replay, as after a rollback) before its next step: the
  token a beam emits is always the token its cache holds.
- Retrospection, per request: each step records, per beam, the column most candidates point at
  (mode over candidates). When the mode over beams, ``loc`` (>= 10), is the recorded column of
  more than ``threshold`` steps of EVERY beam, the request rolls back (``rollback_position``): to
  position ``loc + 1`` (or ``loc`` once that position has been rolled back to
  ``num_attn_candidates`` times; never more often than that per position), at most ``window``
  tokens back from the token being decided. It restores the beams as they were before that
  position was decided, bans the (beam, token) choices made there (accumulating over rollbacks),
  and decides again over the full vocabulary. Restored beams reuse the longest prefix any
  current beam of the request still holds in cache; the keys after it are masked
  (``BatchState.rewind``) and the missing tokens are fed again, so no prompt is re-run. Other
  requests keep decoding meanwhile.
- The reference's restore index is ``min(loc + 1, t - 1)`` for a rollback found while deciding
  token ``t`` (its history bookkeeping); this module uses the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from veridical.errors import InputError

from .beam import Beams
from .context import MethodContext
from .state import BatchState, row_index

EARLY_TOKENS = 10  # the first response tokens are judged by their image attention
MIN_ROLLBACK_LOC = 10  # no rollback to a column before this
LOG_SCORE_FACTOR = math.log(1e-7)  # the reference's column score is 1e-7 x the product
PENALTY_MAX = torch.finfo(torch.float32).max


# ------------------------------------------------------------------------------- pure math


def log_factors(attention: torch.Tensor, scale: float) -> torch.Tensor:
    """``log(scale * attention)`` in float64, as a sum, so that a huge ``scale`` cannot
    overflow (0 attention: -inf)."""
    return math.log(scale) + attention.double().log()


def log_column_products(window: torch.Tensor, scale: float) -> torch.Tensor:
    """``log prod_{i >= j} scale * window[..., i, j]`` for each column ``j`` of lower-triangular
    attention windows (..., t, t) -> (..., t), float64."""
    t = window.shape[-1]
    lower = torch.ones(t, t, dtype=torch.bool, device=window.device).tril()
    return torch.where(lower, log_factors(window, scale), 0.0).sum(dim=-2)


def log_column_scores(window: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's column scores ``1e-7 * prod_{i >= j} scale * window[i, j]``, as logs."""
    return LOG_SCORE_FACTOR + log_column_products(window, scale)


def candidate_log_scores(log_colprod: torch.Tensor, rows: torch.Tensor, scale: float
                         ) -> torch.Tensor:
    """Log column scores for candidates: ``log_colprod`` (nb, t) = ``log_column_products`` of a
    beam's response rows, ``rows`` (nb, k, t + 1) the candidates' rows -> (nb, k, t + 1)."""
    t = log_colprod.shape[-1]
    factors = log_factors(rows, scale)
    products = torch.cat([log_colprod[:, None, :] + factors[..., :t], factors[..., t:]], dim=-1)
    return LOG_SCORE_FACTOR + products


def over_trust_penalty(best_log_score: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * exp(best_log_score)`` in float32, capped at float32's largest value (see the
    module docstring): the reference's ``penalty_weights * score`` wherever that is finite."""
    log_weight = math.log(weight) if weight > 0 else -math.inf
    return (best_log_score + log_weight).exp().clamp(max=PENALTY_MAX).float()


def penalty(log_scores: torch.Tensor, image_mass: torch.Tensor, n_response: int, weight: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the candidates' logits lose (nb, k), column of their max score (nb, k)) for
    candidates deciding response token ``n_response - 1``: minus ``weight`` x the image attention
    mass for the first 10 tokens (``n_response <= 10``), else the over-trust penalty."""
    best, loc = log_scores.max(dim=-1)
    if n_response <= EARLY_TOKENS:
        return -weight * image_mass, loc
    return over_trust_penalty(best, weight), loc


def rollback_target(history: torch.Tensor, loc: int, threshold: int) -> bool:
    """Whether the column ``loc`` recurs more than ``threshold`` times in EVERY beam's history
    (nb, steps) of recorded columns (and ``loc`` is not among the first 10)."""
    if loc < MIN_ROLLBACK_LOC:
        return False
    return bool(((history == loc).sum(-1) > threshold).all())


def rollback_position(loc: int, n_response: int, rolled: dict[int, int], limit: int,
                      window: int) -> tuple[int, int] | None:
    """Where a rollback to column ``loc`` goes while deciding response token ``n_response - 1``:
    ``(counted, restore)``. ``counted`` is the position whose rollback count ``rolled`` it uses:
    ``loc + 1``, or ``loc`` once ``loc + 1`` has ``limit`` rollbacks (None when both have).
    ``restore`` is the token decided again: ``counted``, but at most ``window`` tokens back
    and at most the previous token (the reference's bookkeeping)."""
    counted = loc + 1
    if rolled.get(counted, 0) >= limit:
        counted = loc
    if rolled.get(counted, 0) >= limit:
        return None
    return counted, min(max(counted, n_response - 1 - window), n_response - 2)


# ------------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class OperaSettings:
    """The method's validated parameters (defaults: ``methods/opera.py``)."""

    beams: int
    scale_factor: float
    threshold: int
    candidates: int
    penalty_weights: float
    window: int


@dataclass
class _Seq:
    """OPERA's state of one request (its ``nb`` beams are consecutive slots)."""

    index: int
    beams: Any  # beam.Beams of this request alone
    logits: torch.Tensor  # (n_branches * nb, V) rows predicting the next token
    nb: int
    scale: float
    t: int = 0  # the response token being decided
    tokens: list[list[int]] = field(default_factory=list)  # per slot: response tokens in cache
    resp: list[list[int]] = field(default_factory=list)  # per slot: their cache indices
    log_colprod: torch.Tensor | None = None  # (nb, t): log_column_products of each beam
    rows: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # prefix -> row
    history: list[Any] = field(default_factory=list)  # beams at the start of each step
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> flat choices
    locs: list[torch.Tensor] = field(default_factory=list)  # step -> (nb,) recorded column
    rolled: dict[int, int] = field(default_factory=dict)  # rollbacks per position
    bans: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> banned flat indices
    replay: list[list[int]] | None = None  # tokens still to feed per slot
    then: str = ""  # after the replay: "redo" (decide again) or "go" (decode on)
    pending: list[torch.Tensor | None] = field(default_factory=list)
    cand: torch.Tensor | None = None  # (nb, k) candidate tokens of this step
    cand_logit: torch.Tensor | None = None  # (nb, k) their scores
    result: tuple[list[int], str] | None = None


def opera_search(ctx: MethodContext, state: BatchState, method: Any, n_branches: int, config: Any,
                 seeds: list[int | None], opts: OperaSettings, trace: list | None = None
                 ) -> list[tuple[list[int], str]]:
    """Decode every request with OPERA (see the module docstring); ``trace`` (a list) receives
    one dict per normal step for tests."""
    if config.do_sample:
        raise InputError("opera is a beam search: use do_sample=False")
    if config.num_beams not in (1, opts.beams):
        raise InputError(f"opera sets its beams itself (beams={opts.beams}); leave num_beams at "
                         f"1 or pass the method argument beams={config.num_beams}")
    n, nb, k = len(seeds), opts.beams, opts.candidates
    names = state.info.names
    logits = state.prefill()
    expand = torch.arange(n, device=logits.device).repeat_interleave(nb)
    rows = row_index(expand, n, n_branches)
    state.select(rows)
    logits = logits[rows]
    seqs = []
    for i in range(n):
        slots = torch.arange(i * nb, (i + 1) * nb, device=logits.device)
        seqs.append(_Seq(i, Beams.start(1, nb), logits[row_index(slots, n * nb, n_branches)],
                         nb, opts.scale_factor, tokens=[[] for _ in range(nb)],
                         resp=[[] for _ in range(nb)],
                         log_colprod=torch.zeros(nb, 0, dtype=torch.float64,
                                                 device=logits.device)))
    results: list[tuple[list[int], str]] = [([], "length")] * n
    pad = ctx.pad_id
    # A guard only: each position is rolled back to at most 2k times (k at loc + 1, k at loc),
    # and a rollback replays at most the tokens decoded so far.
    limit = (config.max_new_tokens + 2) * (1 + 2 * k * (config.max_new_tokens + 2))
    for _ in range(limit):
        if not seqs:
            break
        n_slots = len(seqs) * nb
        feed = torch.full((n_slots, k), pad, dtype=torch.long, device=logits.device)
        for q, sq in enumerate(seqs):
            if sq.replay is None:
                scores = ctx.scores(method, sq.logits, nb, names, sq.t)
                sq.cand_logit, sq.cand = scores.topk(k, dim=-1)  # (nb, k)
                feed[q * nb:(q + 1) * nb] = sq.cand
            else:
                for j, todo in enumerate(sq.replay):
                    if todo:
                        feed[q * nb + j] = todo[0]
        out = state.step_tree(feed.repeat(n_branches, 1))  # (R, k, V)
        probs = state.captured["opera"]  # (n_slots, k, L + k): max over heads
        length = state.mask.shape[1]
        image = state.image_keys  # (R, L + k), None for text-only models
        if image is None:
            image = torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.bool,
                                device=probs.device)
        index, choice, advance, rewinds, keep = [], [], [], [], []
        for q, sq in enumerate(seqs):
            base = q * nb
            slot_rows = slice(base, base + nb)
            if sq.index in ctx.cancelled:  # seen between two steps: it leaves the batch
                results[sq.index] = (list(sq.tokens[0]), "cancelled")
                continue
            if sq.replay is None:
                step = _normal_step(ctx, sq, probs[slot_rows], image[slot_rows].float(), out,
                                    length, base, n_slots, n_branches, opts, config, trace)
            else:
                step = _replay_step(ctx, method, sq, probs[slot_rows], out, length, base,
                                    n_slots, n_branches, names, config)
            if step is None:  # complete
                results[sq.index] = sq.result
                continue
            parents, picks, moves, rw = step
            offset = len(index)
            index += [base + p for p in parents]
            choice += picks
            advance += moves
            rewinds += [(offset + j, keep_at, m) for j, keep_at, m in rw]
            keep.append(sq)
        seqs = keep
        if not seqs:
            break
        slots = torch.tensor(index, device=logits.device)
        state.select(row_index(slots, n_slots, n_branches))
        state.commit(torch.tensor(choice, device=logits.device).repeat(n_branches),
                     torch.tensor(advance, device=logits.device).repeat(n_branches))
        for row, keep_at, m in rewinds:
            for b in range(n_branches):
                state.rewind(b * len(index) + row, keep_at, m)
    else:
        raise RuntimeError("opera: the step guard was reached; please report this")
    return results


def _normalised(probs: torch.Tensor, columns: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Rows (nb, k, kv) -> response-order rows (nb, k, t + 1): the response keys ``columns``
    (nb, t), then each candidate's own key ``own`` (k,), divided by the row's total."""
    nb, k, _ = probs.shape
    total = probs.sum(-1, keepdim=True)
    resp = probs.gather(-1, columns[:, None, :].expand(nb, k, columns.shape[-1]))
    itself = probs.gather(-1, own[None, :, None].expand(nb, k, 1))
    return torch.cat([resp, itself], dim=-1) / total


def _normal_step(ctx, sq: _Seq, probs, image, out, length, base, n_slots, n_branches,
                 opts: OperaSettings, config, trace):
    nb, k, t = sq.nb, opts.candidates, sq.t
    device = probs.device
    columns = torch.tensor(sq.resp, dtype=torch.long, device=device).view(nb, t)
    own = length + torch.arange(k, device=device)
    rows = _normalised(probs, columns, own)  # (nb, k, t + 1)
    image_mass = (probs * image[:, None, :]).sum(-1) / probs.sum(-1)
    log_scores = candidate_log_scores(sq.log_colprod, rows, opts.scale_factor)
    pen, loc = penalty(log_scores, image_mass, t + 1, opts.penalty_weights)
    row_mode = loc.mode(dim=-1).values  # (nb,)
    sq.history.append(sq.beams.take(torch.tensor([0])))
    sq.locs.append(row_mode)
    target = int(row_mode.mode().values)
    penalised = sq.cand_logit - pen.to(sq.cand_logit.dtype)
    if trace is not None:
        trace.append({"request": sq.index, "t": t, "candidates": sq.cand.clone(),
                      "tokens": [list(x) for x in sq.tokens],
                      "running": sq.beams.running[0].tolist(), "logits": sq.logits.clone(),
                      "rows": rows.clone(), "log_scores": log_scores.clone(),
                      "penalty": pen.clone(), "image_mass": image_mass.clone(), "loc": target})
    where = (rollback_position(target, t + 1, sq.rolled, opts.candidates, opts.window)
             if rollback_target(torch.stack(sq.locs, -1), target, opts.threshold) else None)
    if where is not None:
        counted, restore = where
        sq.rolled[counted] = sq.rolled.get(counted, 0) + 1
        return _rollback(sq, restore, trace)
    vocab = sq.cand_logit.new_full((nb, out.shape[-1]), -999.0)
    vocab.scatter_(1, sq.cand, penalised)
    return _decide(ctx, sq, torch.log_softmax(vocab, dim=-1), out, length, base, n_slots,
                   n_branches, config, rows=rows)


def _decide(ctx, sq: _Seq, log_probs, out, length, base, n_slots, n_branches, config,
            rows=None):
    """One beam step of ``sq`` from log-probs (nb, V); returns the rows' moves or None.
    ``rows`` (nb, k, t + 1): the attention rows of the candidates fed side by side this step
    (None after a rollback)."""
    nb, t = sq.nb, sq.t
    vocab = log_probs.shape[-1]
    parent, complete, best = sq.beams.advance(ctx, log_probs.cpu(), t, config)
    token = sq.beams.running[0, :, -1]
    sq.chosen[t] = parent[0] * vocab + token
    if complete[0]:
        sq.result = best[0]
        return None
    parents = parent[0].tolist()
    if rows is not None:
        par, tok = parent[0].to(rows.device), token.to(rows.device)
        hit = sq.cand[par] == tok[:, None]  # (nb, k): the candidate each beam continues with
        if hit.any(-1).all():
            return _keep_candidates(sq, rows, out, par, tok, hit.float().argmax(-1), length,
                                    base, n_slots, n_branches)
    # After a rollback, or when a beam chose a filler (not among its parent's candidates, so
    # never fed): every beam's chosen token is fed next (a one-token replay).
    sq.tokens = [list(sq.tokens[p]) for p in parents]
    sq.resp = [list(sq.resp[p]) for p in parents]
    sq.replay, sq.then = [[int(x)] for x in token], "go"
    sq.pending = [None] * nb
    return parents, [0] * nb, [False] * nb, []


def _keep_candidates(sq: _Seq, rows, out, par, tok, pick, length, base, n_slots, n_branches):
    """Each beam keeps its parent's candidate ``pick`` (nb,), the token ``tok``: its keys and
    values, attention row and logits."""
    t = sq.t
    chosen = rows[par, pick]  # (nb, t + 1)
    factors = log_factors(chosen, sq.scale)
    sq.log_colprod = torch.cat([sq.log_colprod[par] + factors[:, :t], factors[:, t:]], dim=-1)
    out_rows = row_index(base + par, n_slots, n_branches)
    sq.logits = out[out_rows, pick.repeat(n_branches)]  # branch-major (n_branches * nb, V)
    parents = par.tolist()
    sq.tokens = [sq.tokens[p] + [x] for p, x in zip(parents, tok.tolist())]
    sq.resp = [sq.resp[p] + [length] for p in parents]
    for j, toks in enumerate(sq.tokens):
        sq.rows[tuple(toks)] = chosen[j]
    sq.t = t + 1
    return parents, pick.tolist(), [True] * sq.nb, []


def _rollback(sq: _Seq, r: int, trace):
    """Restore the beams at the start of step ``r``; their rows resume from the longest prefix a
    current row holds, and replay the rest."""
    ban = sq.chosen[r]
    sq.bans[r] = ban if r not in sq.bans else torch.cat([sq.bans[r], ban])
    for later in [s for s in sq.bans if s > r]:
        del sq.bans[later]
    restored = sq.history[r]
    sq.history, sq.locs = sq.history[:r + 1], sq.locs[:r + 1]
    sq.beams = restored.take(torch.tensor([0]))
    sq.t = r
    if trace is not None:
        trace.append({"request": sq.index, "rollback_to": r})
    parents, rewinds, tokens, resp, replay = [], [], [], [], []
    for j in range(sq.nb):
        prefix = sq.beams.running[0, j].tolist()
        best_src, best_m = 0, -1
        for src, have in enumerate(sq.tokens):
            m = 0
            while m < min(len(have), len(prefix)) and have[m] == prefix[m]:
                m += 1
            if m > best_m:
                best_src, best_m = src, m
        m = min(best_m, r - 1)
        parents.append(best_src)
        rewinds.append((j, sq.resp[best_src][m], m))
        tokens.append(prefix[:m])
        resp.append(sq.resp[best_src][:m])
        replay.append(prefix[m:])
    sq.tokens, sq.resp, sq.replay, sq.then = tokens, resp, replay, "redo"
    sq.pending = [None] * sq.nb
    return parents, [0] * sq.nb, [False] * sq.nb, rewinds


def _replay_step(ctx, method, sq: _Seq, probs, out, length, base, n_slots, n_branches,
                 names, config):
    """Feed one pending token per slot; when all are fed, decide again (after a rollback) or
    go back to normal steps."""
    nb = sq.nb
    moves = []
    for j in range(nb):
        todo = sq.replay[j]
        if not todo:
            moves.append(False)
            continue
        token = todo.pop(0)
        columns = torch.tensor([sq.resp[j]], dtype=torch.long, device=probs.device)
        own = torch.tensor([length], device=probs.device)
        row = _normalised(probs[j:j + 1, :1], columns, own)[0, 0]  # slot 0 holds the token
        sq.tokens[j].append(token)
        sq.resp[j].append(length)
        sq.rows[tuple(sq.tokens[j])] = row
        moves.append(True)
        if not todo:
            slot = torch.tensor([base + j], device=out.device)
            sq.pending[j] = out[row_index(slot, n_slots, n_branches), 0]
    if any(sq.replay):
        return list(range(nb)), [0] * nb, moves, []
    logits = torch.stack(sq.pending, dim=1).flatten(0, 1)  # (n_branches * nb, V)
    if sq.then == "go":
        sq.replay = None
        sq.logits = logits
        sq.t += 1
        sq.log_colprod = torch.stack([_log_colprod(sq, toks) for toks in sq.tokens])
        return list(range(nb)), [0] * nb, moves, []
    # redo: the full vocabulary, shifted below zero, the banned choices at -999 (the reference)
    scores = ctx.scores(method, logits, nb, names, sq.t)
    shifted = scores - (999.0 + scores.min(dim=-1, keepdim=True).values)
    flat = shifted.reshape(-1)
    flat[sq.bans[sq.t].to(flat.device)] = -999.0
    step = _decide(ctx, sq, torch.log_softmax(flat.view(nb, -1), dim=-1), out, length, base,
                   n_slots, n_branches, config)
    if step is None:
        return None
    parents, picks, _, _ = step
    return parents, picks, [moves[p] for p in parents], []


def _log_colprod(sq: _Seq, tokens: list[int]) -> torch.Tensor:
    """``log_column_products`` of the stored rows of a beam's response."""
    t = len(tokens)
    window = torch.zeros(t, t, device=sq.logits.device)
    for i in range(t):
        window[i, : i + 1] = sq.rows[tuple(tokens[: i + 1])]
    return log_column_products(window, sq.scale)
