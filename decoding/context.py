"""What a method sees of the engine: the public context its hooks and searches receive.

A method's hooks (``Method.install``, ``prepare``, ``attention_edits``) and a search strategy
(``Method.search``) get a :class:`MethodContext`, never the engine itself, so adding a method of
any axis touches no engine file. The context offers:

- the model, its processor (and tokenizer), its architecture adapter, its name and device;
- ``eos_ids`` and ``pad_id``; ``head_profile`` (the model's head profile, or None: see
  ``veridical.heads``);
- ``encode(request)``: one request's model inputs (batch dimension 1), chat template applied;
  ``collate(rows)``: a left-padded batch on the model's device; ``prefill_positions(batch)``:
  that batch's position ids by the model's own rule;
- ``scores(method, logits, n_slots, names, step)``: the method's next-token scores from the
  logits of all branch rows; ``finished(token_ids, config)``: whether a sequence ended;
- ``cancelled``: the requests cancelled while the call runs (a search checks it between steps);
- ``current_plan()``: the edit plan of the forward running now (inside attention hooks), whose
  ``data(name)`` is the per-request state a method prepared and ``key_state`` its per-key state.

The batch a search works on is a :class:`~.state.BatchState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import EditPlan, current_plan
from .config import DecodingConfig
from .inputs import collate, encode
from .method import Method, Request
from .state import prefill_positions
from .stops import finish_reason


@dataclass
class MethodContext:
    """See the module docstring."""

    model: torch.nn.Module
    processor: Any
    adapter: Any
    name: str
    eos_ids: list[int]
    pad_id: int
    head_profile: dict | None = None
    attention_impl: str = "auto"  # "auto", "triton" or "torch": edited layers' route
    # requests cancelled while the call runs (the stream's ``cancel``): searches that know their
    # tokens only at the end (beam search, OPERA) end them between two steps
    cancelled: set[int] = field(default_factory=set)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def encode(self, request: Request) -> dict[str, torch.Tensor]:
        """One request's model inputs (batch dimension 1), the chat template applied."""
        return encode(self.processor, request.image, request.prompt, request.system)

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Left-padded batch on the model's device, pixels in the model's dtype."""
        batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(self.model.dtype)
        return batch

    def prefill_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids of a collated batch, as ``model.generate`` computes them."""
        return prefill_positions(self.model, batch)

    def scores(self, method: Method, logits: torch.Tensor, n_slots: int, names: list[str],
               step: int) -> torch.Tensor:
        """Next-token scores (S, V) of every slot from the logits of all rows (S * nb, V);
        ``names`` are the row blocks' branch names, the real input first."""
        if len(names) == 1:
            return method.combine(logits, {}, step)
        blocks = logits.view(len(names), n_slots, -1)
        return method.combine(blocks[0], dict(zip(names[1:], blocks[1:])), step)

    def finished(self, token_ids: list[int], config: DecodingConfig) -> str | None:
        """``"stop"`` (EOS, unless ignored, or a stop string), ``"length"``, or None."""
        return finish_reason(token_ids, self.eos_ids, self.tokenizer, config)

    @staticmethod
    def current_plan() -> EditPlan | None:
        """The edit plan of the running forward (None outside an edited forward)."""
        return current_plan()
