"""The batch state: the KV cache rows of a batch and everything kept per row beside them.

Row layout: a *slot* is one sequence being decoded (a request, or one beam of a request). With
``S`` live slots and ``nb`` branches (the real input first), cache row ``b * S + s`` holds branch
``b`` of slot ``s`` (:func:`row_index`). Every branch of a slot is fed the token chosen for it.

Per row, :class:`BatchState` keeps one table (:meth:`BatchState.per_row`) re-indexed as a whole
by one helper whenever rows are dropped, reordered or repeated (finished requests, beams) or
merged (requests joining a running batch):

- ``mask`` (R, L): the attention mask over the cached keys;
- ``image_keys`` (R, L): which keys are image tokens (kept only when attention edits need it);
- ``key_state[name]`` (R, L, ...): per-key state the edits' hooks wrote (VAR's sink flags);
- ``row_data[name]`` (R, ...): per-request state a method prepared (VHR's head selection);
- ``positions`` / ``prompt_end`` (..., R, T): the next position ids and each row's last prompt
  position (Qwen's multimodal rope has a leading dimension of 3);
- and the cache's own rows.

The attention edits of a forward are activated as an :class:`~.attention.EditPlan` built from
this table (``plan_active``); what they captured is in ``captured`` after the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .attention import EditPlan, plan_active
from .method import RowInfo

# (field name, tensor, its row dim, its key dim or None) -> the new tensor
RowFn = Callable[[str, torch.Tensor, int, "int | None"], torch.Tensor]


class BatchState:
    """The cache rows of a batch with their attention mask, position ids and per-row state."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], cache_kw: str,
                 info: RowInfo, image_id: int | None = None, edits: list | None = None,
                 row_data: dict[str, torch.Tensor] | None = None, impl: str = "auto"):
        self.model = model
        self.impl = impl  # attention kernels' dispatch for edited layers
        self.cache_kw = cache_kw
        self.info = info  # which rows are which branch; hooks read it during forwards
        self.edits = edits or []
        self.row_data = row_data or {}  # (R, ...) per-row state for the edits
        self.key_state: dict[str, torch.Tensor] = {}  # (R, L, ...) per-key state (edits' hooks)
        # (R, L) image-token keys, kept only when attention edits need them
        self.image_keys = (batch["input_ids"] == image_id if self.edits and image_id is not None
                           else None)
        self.batch = batch
        self.mask = batch["attention_mask"]  # (R, L)
        self.positions = prefill_positions(model, batch)  # (..., R, T): batch dim is -2
        self.prompt_end: torch.Tensor | None = None  # (..., R, 1), after the prefill
        self.cache = None
        self.captured: dict[str, Any] = {}
        self._main: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (slots, rows, index)

    # The per-row table ---------------------------------------------------------------------
    def per_row(self, fn: RowFn) -> None:
        """Replace every per-row tensor ``t`` by ``fn(name, t, row_dim, key_dim)``: the one
        place that knows the table's fields (the cache's rows are handled by the callers)."""
        self.mask = fn("mask", self.mask, 0, 1)
        if self.image_keys is not None:
            self.image_keys = fn("image_keys", self.image_keys, 0, 1)
        self.key_state = {k: fn(f"key_state/{k}", v, 0, 1) for k, v in self.key_state.items()}
        self.row_data = {k: fn(f"row_data/{k}", v, 0, None) for k, v in self.row_data.items()}
        self.positions = fn("positions", self.positions, self.positions.dim() - 2, None)
        if self.prompt_end is not None:
            self.prompt_end = fn("prompt_end", self.prompt_end, self.prompt_end.dim() - 2, None)

    def fields(self) -> dict[str, torch.Tensor]:
        """The per-row tensors by name (as :meth:`per_row` names them)."""
        out: dict[str, torch.Tensor] = {}
        self.per_row(lambda name, t, *_: out.setdefault(name, t))
        return out

    def _plan(self, n_new: int) -> EditPlan | None:
        if not self.edits:
            return None
        keys = self.image_keys
        if keys is None:
            keys = torch.zeros_like(self.mask, dtype=torch.bool)
        if self._main is None or self._main[0] != self.info.n_slots:  # rows changed
            rows = self.info.mask("main")
            self._main = (self.info.n_slots, rows, rows.nonzero().flatten())
        _, rows, index = self._main
        return EditPlan(self.edits, rows, keys, self.row_data, self.key_state,
                        impl=self.impl, n_new=n_new, index=index)

    def _forward(self, n_new: int = 1, **inputs) -> Any:
        """One model forward with the edit plan active (``n_new``: how many trailing query
        positions are next-token positions); keeps the per-key state hooks wrote and what the
        edits captured (``self.captured``)."""
        plan = self._plan(n_new)
        with plan_active(plan):
            out = self.model(**inputs)
        self.captured = plan.captured if plan is not None else {}
        if plan is not None:
            for name, fresh in plan.fresh.items():
                past = self.key_state.get(name)
                self.key_state[name] = fresh if past is None else torch.cat([past, fresh], 1)
        return out

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        out = self._forward(
            **self.batch, position_ids=self.positions, use_cache=True, logits_to_keep=1
        )
        self.batch = {}  # images are consumed; keep no reference
        self.cache = getattr(out, "cache", None) or out.past_key_values
        self.positions = self.positions[..., -1:]
        self.prompt_end = self.positions  # position of each row's last prompt token
        return out.logits[:, -1, :].float()  # (R, V)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (R,) and return the next logits (R, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        if self.image_keys is not None:
            self.image_keys = torch.cat(
                [self.image_keys, self.image_keys.new_zeros(self.image_keys.shape[0], 1)], dim=-1)
        self.positions = self.positions + 1
        out = self._forward(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        return out.logits[:, -1, :].float()

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) rows: row i becomes old row ``index[i]``. ``index``
        is branch-major like the rows (see the module docstring)."""
        self.info.n_slots = len(index) // len(self.info.names)
        self.cache.batch_select_indices(index)
        self.per_row(lambda _, t, row_dim, __: t.index_select(row_dim, index.to(t.device)))

    # Side-by-side candidates (OPERA): Q alternative next tokens per row in one forward. ------
    @torch.inference_mode()
    def step_tree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``Q`` alternative next tokens per row (R, Q) in one forward: each sees the
        row's cached keys and itself only, all at the row's next position. Returns their
        logits (R, Q, V); the attention edits' captures are in ``self.captured``. Follow with
        :meth:`commit`, which keeps one of them (or none) per row."""
        n_rows, q = tokens.shape
        length = self.mask.shape[1]
        visible = torch.cat([self.mask.bool()[:, None, :].expand(n_rows, q, length),
                             torch.eye(q, dtype=torch.bool, device=self.mask.device)
                             .expand(n_rows, q, q)], dim=-1)  # (R, Q, L + Q)
        dtype = self.model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]  # (R, 1, Q, L + Q)
        if self.image_keys is not None:
            self.image_keys = torch.cat([self.image_keys, self.image_keys.new_zeros(n_rows, q)], -1)
        positions = (self.positions + 1).expand(*self.positions.shape[:-1], q)
        out = self._forward(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self.cache_kw: self.cache}, n_new=q)
        self._pending = q
        return out.logits.float()

    @torch.inference_mode()
    def commit(self, choice: torch.Tensor, advance: torch.Tensor) -> None:
        """After :meth:`step_tree`: row ``r`` keeps candidate ``choice[r]`` as its next token
        when ``advance[r]``; otherwise the new position is a hole (masked, position not used)."""
        q = self._pending
        length = self.mask.shape[1]
        rows = torch.arange(len(choice), device=choice.device)
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                t[:, :, length] = t[rows, :, length + choice]
        if q > 1:
            self.cache.crop(-(q - 1))
        advance = advance.to(self.mask.device)
        self.mask = torch.cat([self.mask, advance[:, None].to(self.mask.dtype)], dim=-1)
        if self.image_keys is not None:
            self.image_keys = self.image_keys[:, : length + 1]
        self.key_state = {k: torch.cat([v[:, :length], v[rows, length + choice][:, None]], 1)
                          for k, v in self.key_state.items()}
        self.positions = self.positions + advance[:, None].to(self.positions.dtype)

    @torch.inference_mode()
    def rewind(self, row: int, keep: int, n_response: int) -> None:
        """Row ``row`` forgets every key from cache index ``keep`` on (they become holes) and
        continues as if it had ``n_response`` generated tokens."""
        self.mask[row, keep:] = 0
        self.positions[..., row, :] = self.prompt_end[..., row, :] + n_response

    # Joining a running batch ------------------------------------------------------------------
    def can_extend(self) -> bool:
        """Whether :meth:`extend` can merge into this cache (plain ``DynamicCache`` layers)."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @torch.inference_mode()
    def extend(self, other: BatchState, logits: torch.Tensor, other_logits: torch.Tensor
               ) -> torch.Tensor:
        """Take in ``other``'s slots after this state's. Both hold rows waiting for their next
        token (``logits`` (R, V), ``other_logits``) under the same method and branches. The
        shorter side is left-padded with masked keys; rows stay branch-major. Returns the
        logits of every row in the new order."""
        n_branches = len(self.info.names)
        mine, theirs = self.mask.shape[0] // n_branches, other.mask.shape[0] // n_branches
        length = max(self.mask.shape[1], other.mask.shape[1])

        def interleave(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> torch.Tensor:
            blocks = zip(a.split(mine, dim), b.split(theirs, dim))
            return torch.cat([t for pair in blocks for t in pair], dim)

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = length - x.shape[dim]
            return torch.cat([x.new_zeros(shape), x], dim) if shape[dim] else x

        for layer, new in zip(self.cache.layers, other.cache.layers):
            layer.keys = interleave(pad(layer.keys, 2), pad(new.keys, 2))
            layer.values = interleave(pad(layer.values, 2), pad(new.values, 2))
        other_rows = other.fields()

        def merge(name: str, t: torch.Tensor, row_dim: int, key_dim: int | None) -> torch.Tensor:
            o = other_rows[name]
            if key_dim is not None:
                return interleave(pad(t, key_dim), pad(o, key_dim), row_dim)
            if row_dim == 0:
                t, o = broadcast_rows(t, o)
            return interleave(t, o, row_dim)

        self.per_row(merge)
        self.info.n_slots = mine + theirs
        self._main = None
        return interleave(logits, other_logits)


def broadcast_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row state of two groups of rows with the same trailing shape, size-1 dims expanded
    (FIA's selection of a request without an image is one column that stands for every image
    token)."""
    if a.shape[1:] == b.shape[1:]:
        return a, b
    shape = torch.broadcast_shapes(a.shape[1:], b.shape[1:])
    return a.expand(len(a), *shape), b.expand(len(b), *shape)


def prefill_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of a collated prompt batch by the model's own rule (multimodal rope for
    Qwen), exactly as ``generate()`` computes them."""
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:
        return prepare(batch["input_ids"], kwargs)
    mask = batch["attention_mask"].long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def row_index(slots: torch.Tensor, n_slots: int, n_branches: int) -> torch.Tensor:
    """Cache rows of the given slots, branch-major (see the module docstring)."""
    return torch.cat([b * n_slots + slots for b in range(n_branches)])
