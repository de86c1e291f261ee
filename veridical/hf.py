"""For people who keep calling ``model.generate`` themselves: a method as a ``LogitsProcessor``.

``logits_processor(method, engine_or_model, inputs, processor=None, seed=None, **args)`` builds
the method's extra branches for the requests in ``inputs`` (``{"images": [...], "prompts":
[...]}``, the same requests the caller encoded for ``generate``) and returns a transformers
``LogitsProcessor`` that owns the branches' KV cache: on its first call it prefills the branch
rows, afterwards it feeds them the token ``generate`` chose for each row, and it returns the
method's combination of ``generate``'s scores with the branch logits. Forward hooks a method
needs (SCMoE's weak routing) are installed only around the processor's own forward.

For greedy decoding it gives the same tokens as ``Engine.generate`` with the same seeds
(tested). Limits:
- greedy and sampling only: beam search reorders ``generate``'s cache every step, which the
  processor cannot follow (it raises when the row count is not the request count);
- put it first in the processor list: it expects raw logits (warpers such as temperature
  belong after it, as ``generate`` orders them);
- one ``generate`` call per processor (it keeps per-call state); build a new one per call;
- the branch forward is a second model call per step, not one batched forward as in the engine;
- attention-edit methods are not available this way (they need the engine's attention routing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from veridical.adapters import adapter_for
from veridical.decoding.engine import Engine
from veridical.decoding.method import Request, RowInfo
from veridical.decoding.registry import resolve
from veridical.decoding.seeds import request_seeds
from veridical.decoding.state import BatchState
from veridical.errors import InputError
from veridical.images import load_image


class BranchLogitsProcessor(LogitsProcessor):
    """See the module docstring."""

    def __init__(self, engine: Engine, method, requests: list[Request], seeds: list[int | None]):
        self.ctx, self.method = engine.context(), method  # what the method's hooks see
        self.branches = method.branches()
        self.n = len(requests)
        self.step = 0
        self.rows: BatchState | None = None
        if self.branches:
            batch = engine.collate(engine.branch_rows(requests, self.branches, seeds))
            info = RowInfo([b.name for b in self.branches], n_slots=self.n)
            self.rows = BatchState(engine.model, batch, engine.cache_kw, info)

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        handles = self.method.install(self.ctx, self.rows.info)
        try:
            if self.step == 0:
                return self.rows.prefill()
            return self.rows.step(input_ids[:, -1].repeat(len(self.branches)))
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != self.n:
            raise InputError(
                f"the logits processor was built for {self.n} requests but generate runs "
                f"{input_ids.shape[0]} rows; beam search and num_return_sequences > 1 are not "
                "supported this way: use veridical's Engine.generate"
            )
        branch_logits = {}
        if self.rows is not None:
            logits = self._forward(input_ids).to(scores.device)
            names = [b.name for b in self.branches]
            branch_logits = dict(zip(names, logits.view(len(names), self.n, -1)))
        out = self.method.combine(scores, branch_logits, self.step)
        self.step += 1
        return out


def logits_processor(method: str, engine_or_model: Any, inputs: dict[str, Sequence],
                     processor: Any = None, seed: int | Sequence[int | None] | None = None,
                     **args: Any) -> BranchLogitsProcessor:
    """Build ``method`` (with ``args``) as a ``LogitsProcessor`` for ``model.generate``."""
    if isinstance(engine_or_model, Engine):
        engine = engine_or_model
    else:
        if processor is None:
            raise InputError("pass processor= (the model's processor) when giving a bare model")
        engine = Engine(engine_or_model, processor, adapter_for(engine_or_model.config))
    if not isinstance(inputs, dict) or "prompts" not in inputs:
        raise InputError('inputs must be {"images": [...], "prompts": [...]}, one entry per row '
                         "of the batch passed to generate")
    prompts = list(inputs["prompts"])
    images = list(inputs.get("images") or [None] * len(prompts))
    if len(images) != len(prompts):
        raise InputError(f"inputs has {len(images)} images for {len(prompts)} prompts")
    requests = [Request(load_image(i) if i is not None else None, p)
                for i, p in zip(images, prompts)]
    seeds = request_seeds(seed, len(prompts))
    built = resolve(method, args)
    if built.search() is not None:
        raise InputError(
            f"method {built.name!r} is a search strategy, which a logits processor cannot run "
            "inside model.generate; use engine.generate for it"
        )
    if built.attention_edits(engine.context()):
        raise InputError(
            f"method {built.name!r} edits attention, which a logits processor cannot do inside "
            "model.generate; use engine.generate for it (or its logits-only part, e.g. pai_cfg)"
        )
    return BranchLogitsProcessor(engine, built, requests, seeds)
