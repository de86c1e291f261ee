"""The batched decoding engine.

Contract: ``Engine.generate`` runs many requests, and every extra branch a method asks for, in ONE
batched forward per step. A request's output never depends on what else is in the batch: rows are
left-padded with attention masks and position ids (Qwen's multimodal rope included) computed the
way ``model.generate`` computes them, each row has its own KV cache entry, sampling draws from a
per-request ``torch.Generator``, and finished requests leave the batch. Everything random about
a request derives from its seed alone (decoding/seeds.py); a request given no seed gets a fresh
one, reported as ``GenerationResult.seed``. Greedy decoding equals
``model.generate(do_sample=False)`` token for token and beam search equals transformers' beam
search (same candidate selection, length penalty and early-stopping heuristic).

Streaming and log-probabilities (greedy and sampling; beam search and search methods such as
OPERA only know their tokens at the end): ``run(..., on_token=f)`` calls
``f(request, token_id, logprob)`` for each token as it is chosen (``logprob`` a
:class:`TokenLogprob`, or None without ``DecodingConfig.logprobs``); ``f`` returning False ends
that request at once (finish reason ``"cancelled"``). ``DecodingConfig(logprobs=k)`` records,
per chosen token, its log-probability and the ``k`` most likely tokens' under the scores the
token was chosen from (the method's adjusted scores, before temperature and top-p).
``run(..., on_done=g)`` calls ``g(request, result)`` with a request's final
:class:`GenerationResult` as soon as it is known: when its row finishes (greedy and sampling),
while the rest of the batch decodes on, or at the end (beam search and search methods). A server
answers short requests without waiting for the longest one in their batch.

Joining a running batch (continuous batching; greedy decoding and sampling): ``run(...,
admit=h)`` calls ``h(n_live)`` before each decode step, and with ``n_live = 0`` once every row
has finished (the call ends when that brings nothing); it returns new ``(Request, seed)`` pairs
(or nothing) that join the batch at once: their rows are prefilled in one forward of their own,
left-padded to the batch's length (or the batch to theirs) and merged, and from then on they share
every step. Their indices continue after the requests given (``on_token`` / ``on_done`` use them,
and the results list holds them in that order). A joined request gives the tokens it gives alone:
its rows, masks, positions and per-row state are its own, and a method's per-step rule sees the
request's own step. Beam search, search methods, caches other than transformers' plain
``DynamicCache``, and methods that both install hooks and prepare per-request state with forwards
of their own take no newcomers (``h`` is not called).

Row layout: a *slot* is one sequence being decoded (a request, or one beam of a request). With
``S`` live slots and ``nb`` branches (the real input first), cache row ``b * S + s`` holds branch
``b`` of slot ``s``. Every branch of a slot is fed the token chosen for the slot.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from veridical.errors import InputError
from veridical.images import load_image

from .attention import EditPlan, plan_active, restore, use_edits
from .inputs import collate, encode
from .method import Method, Request, RowInfo
from .registry import resolve
from .sampling import sample, warp
from .seeds import branch_key, derive_seed, fresh_seed, request_seeds
from .stops import cut_at_stop, has_stop

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationResult:
    """What one request produced."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (on_token)
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token, with DecodingConfig.logprobs
    seed: int | None = None  # the seed the request ran with (decoding/seeds.py): replays it


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# (request index, token id, its TokenLogprob or None) -> go on
TokenCallback = Callable[[int, int, "TokenLogprob | None"], bool]
# (request index, its final result)
DoneCallback = Callable[[int, GenerationResult], None]
# (live requests) -> new (request, seed) pairs that join the running batch
AdmitCallback = Callable[[int], "Sequence[tuple[Request, int | None]]"]


@dataclass(frozen=True)
class DecodingConfig:
    """Validated search settings shared by the requests of one ``generate`` call."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k
    ignore_eos: bool = False  # EOS does not end a request (benchmarks: equal lengths)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> InputError:
            return InputError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise bad("temperature", "a number > 0 (use do_sample=False for greedy decoding)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "0 < top_p <= 1")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables top-k)")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise InputError(
                "beam sampling is not supported: use num_beams=1 with do_sample=True, "
                "or do_sample=False with num_beams > 1"
            )
        if not _is_number(self.length_penalty):
            raise bad("length_penalty", "a number")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", "True, False or 'never'")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of them")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False")
        if self.ignore_eos and self.num_beams > 1:
            raise InputError("ignore_eos needs num_beams=1: beam search ends beams at EOS")
        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise bad("logprobs", f"None, or an integer from 0 to {MAX_TOP_LOGPROBS}")
            if self.num_beams > 1:
                raise InputError("logprobs need greedy decoding or sampling (num_beams=1): "
                                 "beam search scores whole sequences, not tokens")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


class _Rows:
    """The cache rows of a batch with their attention mask and next position ids."""

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
        self.positions = _prefill_positions(model, batch)  # (..., R, T): batch dim is -2
        self.cache = None
        self._main: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (slots, rows, index)

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
        self.mask = self.mask[index]
        if self.image_keys is not None:
            self.image_keys = self.image_keys[index]
        self.row_data = {k: v[index] for k, v in self.row_data.items()}
        self.key_state = {k: v[index] for k, v in self.key_state.items()}
        self.positions = self.positions.index_select(-2, index)
        self.prompt_end = self.prompt_end.index_select(-2, index)

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
    def extend(self, other: _Rows, logits: torch.Tensor, other_logits: torch.Tensor
               ) -> torch.Tensor:
        """Take in ``other``'s slots after this state's. Both hold rows waiting for their next
        token (``logits`` (R, V), ``other_logits``) under the same method and branches. The
        shorter side is left-padded with masked keys; rows stay branch-major. Returns the
        logits of every row in the new order."""
        n_branches = len(self.info.names)
        mine, theirs = self.mask.shape[0] // n_branches, other.mask.shape[0] // n_branches
        length = max(self.mask.shape[1], other.mask.shape[1])

        def rows(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> torch.Tensor:
            blocks = zip(a.split(mine, dim), b.split(theirs, dim))
            return torch.cat([t for pair in blocks for t in pair], dim)

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = length - x.shape[dim]
            return torch.cat([x.new_zeros(shape), x], dim) if shape[dim] else x

        def keys(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return rows(pad(a, dim), pad(b, dim))

        for layer, new in zip(self.cache.layers, other.cache.layers):
            layer.keys = keys(layer.keys, new.keys, 2)
            layer.values = keys(layer.values, new.values, 2)
        self.mask = keys(self.mask, other.mask, 1)
        if self.image_keys is not None:
            self.image_keys = keys(self.image_keys, other.image_keys, 1)
        self.key_state = {k: keys(v, other.key_state[k], 1) for k, v in self.key_state.items()}
        self.row_data = {k: rows(*_broadcast_rows(v, other.row_data[k]))
                         for k, v in self.row_data.items()}
        self.positions = rows(self.positions, other.positions, -2)
        self.prompt_end = rows(self.prompt_end, other.prompt_end, -2)
        self.info.n_slots = mine + theirs
        self._main = None
        return rows(logits, other_logits)


def _broadcast_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row state of two groups of rows with the same trailing shape, size-1 dims expanded
    (FIA's selection of a request without an image is one column that stands for every image
    token)."""
    if a.shape[1:] == b.shape[1:]:
        return a, b
    shape = torch.broadcast_shapes(a.shape[1:], b.shape[1:])
    return a.expand(len(a), *shape), b.expand(len(b), *shape)


def _prefill_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # The model's own rule (multimodal rope for Qwen), exactly as generate() computes it.
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:
        return prepare(batch["input_ids"], kwargs)
    mask = batch["attention_mask"].long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _row_index(slots: torch.Tensor, n_slots: int, n_branches: int) -> torch.Tensor:
    """Cache rows of the given slots, branch-major (see the module docstring)."""
    return torch.cat([b * n_slots + slots for b in range(n_branches)])


class Engine:
    """A model, its processor and its architecture adapter, with the batched ``generate``."""

    def __init__(self, model: torch.nn.Module, processor: Any, adapter: Any, name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Edited attention: "auto" = the fused Triton kernel on CUDA, the torch route on CPU
        # (with VAR's numba loops, veridical.kernels.cpu); "triton" / "torch" force one.
        self.attention_impl = "auto"
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        gen = getattr(model, "generation_config", None)
        eos = [getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id]
        self.eos_ids = sorted({i for e in eos if e is not None for i in _as_list(e)})
        pad = getattr(gen, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # Public API ---------------------------------------------------------------------------------
    def generate(
        self,
        images: Any,
        prompts: str | Sequence[str],
        method: str | Method = "none",
        method_args: dict[str, Any] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        seed: int | Sequence[int | None] | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one request (``prompts`` a string) or a batch (a list of strings).

        ``images`` is a PIL image, a path or None per request (a single value for one request).
        ``seed`` is one integer for every request or one per request; ``None`` (or a None
        entry) draws a fresh seed, returned as ``result.seed`` (decoding/seeds.py). ``logprobs=k`` adds each token's log-probability and its top ``k``
        alternatives (module docstring). ``ignore_eos=True`` decodes every request to
        ``max_new_tokens`` (EOS does not end it; greedy decoding and sampling), as speed
        benchmarks need. Returns one :class:`GenerationResult` per request.
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if single:
            image_list = [images]
        elif images is None:
            image_list = [None] * len(prompt_list)
        elif isinstance(images, (list, tuple)):
            image_list = list(images)
        else:
            raise InputError("prompts is a list, so images must be a list too (one per prompt)")
        if len(image_list) != len(prompt_list):
            raise InputError(
                f"got {len(image_list)} images for {len(prompt_list)} prompts; give one image "
                "(or None) per prompt"
            )
        if not prompt_list:
            return []
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        config = DecodingConfig(
            max_new_tokens, do_sample, temperature, top_p, top_k, num_beams, length_penalty,
            early_stopping, stops, logprobs, ignore_eos,
        )
        requests = [self.request(img, p, i) for i, (img, p) in enumerate(zip(image_list, prompt_list))]
        seeds = request_seeds(seed, len(requests))
        results = self.run(requests, resolve(method, method_args), config, seeds)
        return results[0] if single else results

    # Internals ----------------------------------------------------------------------------------
    def request(self, image: Any, prompt: Any, index: int = 0) -> Request:
        """A validated request for :meth:`run`: the prompt checked, the image (PIL image or
        path) loaded; ``index`` names the request in error messages."""
        where = f"request {index}"
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: the prompt is empty; give the user's question as text")
        if image is not None:
            if not self.adapter.multimodal:
                raise InputError(
                    f"{where}: model {self.name!r} is text-only and cannot take an image; "
                    "pass image=None or load a vision-language model"
                )
            image = load_image(image)
        return Request(image=image, prompt=prompt)

    def run(
        self,
        requests: list[Request],
        method: Method,
        config: DecodingConfig,
        seeds: list[int | None],
        on_token: TokenCallback | None = None,
        on_done: DoneCallback | None = None,
        admit: AdmitCallback | None = None,
    ) -> list[GenerationResult]:
        """Decode validated requests with a built method, one seed per request (None: a fresh
        one); ``on_token``, ``on_done`` and ``admit``: see the module docstring."""
        seeds = [fresh_seed() if s is None else s for s in seeds]
        custom = method.search()
        if config.logprobs is not None and custom is not None:
            raise InputError(f"logprobs are not available with {method.name!r}: its search "
                             "chooses whole sequences; leave logprobs unset")
        if config.ignore_eos and custom is not None:
            raise InputError(f"ignore_eos is not available with {method.name!r}: its search "
                             "ends beams at EOS; leave ignore_eos unset")
        branches = method.branches()
        info = RowInfo(["main"] + [b.name for b in branches], n_slots=len(requests))
        edits = method.attention_edits(self)
        image_id = self.adapter.image_token_id(self.model.config)
        prompt_tokens: list[int] = []
        image_tokens: list[int] = []

        def start(new: list[Request], new_seeds: list[int]) -> _Rows:
            """The rows of ``new`` (and of their branches), collated, ready to prefill."""
            rows = [self._encode(r) for r in new] + self.branch_rows(new, branches, new_seeds)
            prompt_tokens.extend(int(r["attention_mask"].sum()) for r in rows[: len(new)])
            image_tokens.extend(int((r["input_ids"] == image_id).sum()) if image_id is not None
                                else 0 for r in rows[: len(new)])
            row_data = {k: v.repeat(len(branches) + 1, *([1] * (v.dim() - 1)))  # every block
                        for k, v in method.prepare(self, new).items()}
            info.n_slots = len(new)  # the hooks see the rows being prefilled
            return _Rows(self.model, self.collate(rows), self._cache_kw, info, image_id, edits,
                         row_data, self.attention_impl)

        state = start(requests, seeds)
        search = custom or (_beam_search if config.num_beams > 1 else _sample_or_greedy)
        results: list[GenerationResult | None] = [None] * len(requests)

        def join(n_live: int) -> tuple[_Rows, list[int]] | None:
            new = list(admit(n_live)) if admit is not None else []
            if not new:
                return None
            new_requests = [r for r, _ in new]
            new_seeds = [fresh_seed() if sd is None else sd for _, sd in new]
            seeds.extend(new_seeds)
            results.extend([None] * len(new))
            return start(new_requests, new_seeds), new_seeds

        def finish(request: int, output: tuple) -> None:
            ids, reason, *logprobs = output
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, config.stop)
            results[request] = GenerationResult(
                text.strip(), ids, "stop" if stopped else reason, prompt_tokens[request],
                len(ids), image_tokens[request], logprobs[0] if logprobs else None,
                seeds[request])
            if on_done is not None:
                on_done(request, results[request])

        handles = method.install(self, info)
        previous = use_edits(self.model, self.adapter.multimodal) if edits else None
        # a newcomer's own forwards (prepare) would run under another request's hooks
        joinable = admit is not None and not (handles and _prepares(method))
        try:
            if search is _sample_or_greedy:
                outputs = search(self, state, method, len(branches) + 1, config, seeds, on_token,
                                 finish, join if joinable else None)
            else:
                outputs = search(self, state, method, len(branches) + 1, config, seeds)
                if on_token is not None:  # these searches know their tokens only now
                    for request, (ids, _) in enumerate(outputs):
                        for token in ids:
                            on_token(request, token, None)
        finally:
            for handle in handles:
                handle.remove()
            if previous is not None:
                restore(self.model, previous)
        for request, output in enumerate(outputs):
            if results[request] is None:
                finish(request, output)
        return results

    def branch_rows(self, requests: list[Request], branches: list, seeds: list[int]
                    ) -> list[dict[str, torch.Tensor]]:
        """Encoded rows of every branch (branch-major), each built with its own generator,
        seeded from its request's seed and the branch's own name (decoding/seeds.py)."""
        rows = []
        for branch in branches:
            key = branch_key(branch.name)
            for request, seed in zip(requests, seeds):
                rng = torch.Generator().manual_seed(derive_seed(seed, "branch", key))
                row = self._encode(branch.make(request, rng))
                if branch.on_pixels is not None and "pixel_values" in row:
                    row["pixel_values"] = branch.on_pixels(row["pixel_values"], rng)
                rows.append(row)
        return rows

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Left-padded batch on the model's device, pixels in the model's dtype."""
        batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(self.model.dtype)
        return batch

    def _encode(self, request: Request) -> dict[str, torch.Tensor]:
        return encode(self.processor, request.image, request.prompt, request.system)

    def _scores(self, method: Method, logits: torch.Tensor, n_slots: int, names: list[str],
                step: int) -> torch.Tensor:
        """Next-token scores (S, V) of every slot from the logits of all rows (S * nb, V);
        ``names`` are the row blocks' branch names, the real input first."""
        if len(names) == 1:
            return method.combine(logits, {}, step)
        blocks = logits.view(len(names), n_slots, -1)
        return method.combine(blocks[0], dict(zip(names[1:], blocks[1:])), step)

    def _finished(self, token_ids: list[int], config: DecodingConfig) -> str | None:
        if token_ids and token_ids[-1] in self.eos_ids and not config.ignore_eos:
            return "stop"
        if config.stop and has_stop(self.tokenizer.decode(token_ids, skip_special_tokens=True),
                                    config.stop):
            return "stop"
        if len(token_ids) >= config.max_new_tokens:
            return "length"
        return None


def _as_list(x: Any) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


def _token_logprobs(scores: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability under ``scores`` and its top ``k``."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None])[:, 0].tolist()
    top_v, top_i = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [TokenLogprob(int(t), p, tuple(zip(i, v)))
            for t, p, i, v in zip(chosen.tolist(), picked, top_i.tolist(), top_v.tolist())]


def _sample_or_greedy(engine: Engine, state: _Rows, method: Method, n_branches: int,
                      config: DecodingConfig, seeds: list[int],
                      on_token: TokenCallback | None = None,
                      on_finish: Callable[[int, tuple], None] | None = None,
                      join: Callable[[int], tuple[_Rows, list[int]] | None] | None = None,
                      ) -> list[tuple]:
    """Greedy decoding or sampling; ``on_finish(request, output)`` as each request ends
    (``output`` as in the returned list: ``(ids, reason)``, plus the logprobs when asked);
    ``join(n_live)``: newcomers' unprefilled rows and seeds, or None (module docstring)."""
    generators: list[torch.Generator] = []  # one per request, from its (resolved) seed
    tokens_of: list[list[int]] = []
    logprobs_of: list[list[TokenLogprob]] = []
    reasons: list[str] = []

    def add(new_seeds: list[int]) -> list[int]:
        """Book-keeping for new requests; their indices."""
        first = len(tokens_of)
        for seed in new_seeds:
            generators.append(torch.Generator().manual_seed(seed))
            tokens_of.append([])
            logprobs_of.append([])
            reasons.append("length")
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
            break
        scores = _slot_scores(engine, method, logits, steps, state.info.names)
        if config.do_sample:
            warped = warp(scores, config.temperature, config.top_k, config.top_p)
            chosen = sample(warped, [generators[r] for r in live])
        else:
            chosen = scores.argmax(dim=-1)
        entries: list[TokenLogprob | None] = [None] * len(live)
        if config.logprobs is not None:
            entries = _token_logprobs(scores, chosen, config.logprobs)
        keep = []
        for slot, (request, token) in enumerate(zip(live, chosen.tolist())):
            tokens_of[request].append(token)
            if entries[slot] is not None:
                logprobs_of[request].append(entries[slot])
            reason = engine._finished(tokens_of[request], config)
            if on_token is not None and not on_token(request, token, entries[slot]):
                reason = reason or "cancelled"
            if reason is None:
                keep.append(slot)
                continue
            reasons[request] = reason
            if on_finish is not None:
                on_finish(request, _output(tokens_of[request], reason, logprobs_of[request],
                                           config))
        if not keep:  # every row finished: newcomers (if any) start afresh
            live, steps = [], []
            continue
        if len(keep) < len(live):
            index = torch.tensor(keep, device=chosen.device)
            state.select(_row_index(index, len(live), n_branches))
            chosen = chosen[index]
            live, steps = [live[s] for s in keep], [steps[s] for s in keep]
        logits = state.step(chosen.repeat(n_branches))
        steps = [step + 1 for step in steps]
    return [_output(t, r, lp, config) for t, r, lp in zip(tokens_of, reasons, logprobs_of)]


def _slot_scores(engine: Engine, method: Method, logits: torch.Tensor, steps: list[int],
                 names: list[str]) -> torch.Tensor:
    """Scores (S, V) of every slot; slots at different decode steps (requests that joined a
    running batch) are scored per step, so a method's per-step rule sees each one's own."""
    if len(set(steps)) == 1:
        return engine._scores(method, logits, len(steps), names, steps[0])
    scores = None
    for step in sorted(set(steps)):
        slots = torch.tensor([s for s, t in enumerate(steps) if t == step], device=logits.device)
        rows = _row_index(slots, len(steps), len(names))
        part = engine._scores(method, logits[rows], len(slots), names, step)
        if scores is None:
            scores = part.new_empty(len(steps), part.shape[-1])
        scores[slots] = part
    return scores


def _prepares(method: Method) -> bool:
    """Whether ``method`` (or a part of it) overrides ``Method.prepare``."""
    parts = getattr(method, "parts", None)  # a composite's
    if parts:
        return any(_prepares(part) for part in parts)
    return type(method).prepare is not Method.prepare


def _output(ids: list[int], reason: str, logprobs: list[TokenLogprob],
            config: DecodingConfig) -> tuple:
    return (ids, reason) if config.logprobs is None else (ids, reason, logprobs)


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

    def advance(self, engine: Engine, log_probs: torch.Tensor, step: int,
                config: DecodingConfig) -> tuple[torch.Tensor, torch.Tensor, list[tuple | None]]:
        """One step from next-token log-probs (b * nb, V) of every running beam.

        Returns ``parent`` (b, nb): the beam each new running beam continues, ``complete`` (b,)
        bool, and per request its best hypothesis ``(ids, reason)`` when complete, else None.
        The new tokens are ``self.running[:, :, -1]``."""
        b, nb = self.scores.shape
        lp, max_new = config.length_penalty, config.max_new_tokens
        keep_k = max(2, 1 + len(engine.eos_ids)) * nb  # candidates kept per request and step
        top_nb = torch.arange(keep_k) < nb
        eos = torch.tensor(engine.eos_ids or [-1])
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
                    if engine._finished(cand_seqs[i, k].tolist(), config) is not None:
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
                reason = "stop" if (ids and ids[-1] in engine.eos_ids) or (
                    config.stop and engine._finished(ids, config) == "stop") else "length"
                best[i] = (ids, reason)
        return parent, complete, best


def _beam_search(engine: Engine, state: _Rows, method: Method, n_branches: int,
                 config: DecodingConfig, seeds: list[int]) -> list[tuple[list[int], str]]:
    """transformers' beam search, per request, with finished requests leaving the batch."""
    n, nb = len(seeds), config.num_beams
    logits = state.prefill()  # (nb_branches * n, V): one row per request and branch
    # Every beam of a request starts from the same prompt rows.
    expand = torch.arange(n, device=logits.device).repeat_interleave(nb)
    rows = _row_index(expand, n, n_branches)
    state.select(rows)
    logits = logits[rows]

    live = list(range(n))
    beams = Beams.start(n, nb)
    best: list[tuple[list[int], str]] = [([], "length")] * n
    for step in range(config.max_new_tokens):
        b = len(live)
        scores = engine._scores(method, logits, b * nb, state.info.names, step)
        log_probs = torch.log_softmax(scores, dim=-1).cpu()  # (b * nb, V)
        parent, complete, done = beams.advance(engine, log_probs, step, config)
        for i in range(b):
            if done[i] is not None:
                best[live[i]] = done[i]
        keep = (~complete).nonzero().flatten()
        if keep.numel() == 0:
            break
        # Reorder (and drop) cache rows: beam j of request i continues from its parent beam.
        parents = (keep[:, None] * nb + parent[keep]).flatten().to(logits.device)
        state.select(_row_index(parents, b * nb, n_branches))
        tokens = beams.running[keep, :, -1].flatten().to(logits.device)
        beams = beams.take(keep)
        live = [live[i] for i in keep.tolist()]
        logits = state.step(tokens.repeat(n_branches))
    return best
