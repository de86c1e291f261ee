"""``VLLMEngine``: veridical's contrastive family inside vLLM, behind the engine's own API.

Contract: ``load_vllm(ref, **vllm_args)`` returns an engine with the same ``generate``,
``request``, ``stream`` and ``run`` as :class:`~veridical.decoding.engine.Engine` (the
:class:`~veridical.backend.Backend` seam), running on a vLLM ``LLMEngine``. It runs the methods
made only of branches and a logits combination (``none``, ``vcd``, ``icd``, ``m3id``, ``ritual``,
``pai_cfg`` and their ``+`` compositions) with greedy decoding or seeded sampling; for the same
inputs and seed it gives the engine's tokens. Other methods (attention edits, forward hooks,
search strategies) and beam search are refused with an error naming the backend that runs them.

How: a request becomes a group of vLLM requests, its real input and one per branch, built by
the engine's own code (``Branch.make`` with the branch's seeded generator; pixel transforms
through the plugin's processor, veridical/vllm/plugin.py). The logits processor
(veridical/vllm/combine.py) combines each complete group's logits and makes all members emit
one token. vLLM schedules requests one by one, so a group can come apart (admission, token
budget, chunked prefill, preemption): then its members' token counts differ after a step. The
backend keeps only the tokens every member emitted together, aborts the members and resubmits
them with those tokens appended to their prompts (prefix caching makes that cheap); the group's
next token is then computed from complete logits again. A group split more than
``MAX_REGROUPS`` times fails with an error saying which engine limits to raise. Stop rules (EOS,
stop strings, length) are the engine's and are applied here; vLLM runs every member greedy with
``ignore_eos``.

Logprobs (``logprobs=k``) are those of the combined scores, read from the processor in the same
process; with tensor or pipeline parallelism the processor runs in other processes and logprobs
are refused with a clear error.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from veridical.decoding.config import DecodingConfig, DoneEvent, Event, GenerationResult, TokenEvent
from veridical.decoding.engine import Engine, EventStream, eos_token_ids
from veridical.decoding.inputs import chat_text
from veridical.decoding.method import Method, Request
from veridical.decoding.seeds import branch_key, derive_seed, fresh_seed
from veridical.decoding.stops import final_text, finish_reason
from veridical.errors import InputError

from . import plugin

logger = logging.getLogger(__name__)

MAX_REGROUPS = 64  # resubmissions of one group before it fails loudly
COMBINER = "veridical.vllm.combine:Combiner"
CPU_KV_CACHE_BYTES = 1 << 30  # vLLM on CPU takes most of the RAM for its cache unless told
def blocked_parts(method: Method) -> list[str]:
    """The parts of ``method`` vLLM cannot run, each with why: it runs only methods made of
    branches and a logits combination."""
    blocked = []
    for part in getattr(method, "parts", None) or [method]:
        kind = type(part)
        if kind.search is not Method.search:
            blocked.append(f"{part.name} (a search strategy)")
        elif kind.attention_edits is not Method.attention_edits:
            blocked.append(f"{part.name} (attention edits)")
        elif kind.install is not Method.install or kind.prepare is not Method.prepare:
            blocked.append(f"{part.name} (forward hooks)")
    return blocked


def vllm_methods() -> list[str]:
    """The registered methods vLLM runs (their '+' compositions run too)."""
    from veridical.decoding.registry import registered, resolve

    return sorted(name for name in registered() if not blocked_parts(resolve(name)))


def unsupported_reason(method: Method) -> str | None:
    """None when vLLM runs ``method``; else a one-line reason naming the backend that does."""
    blocked = blocked_parts(method)
    if not blocked:
        return None
    return (f"method {method.name!r} cannot run on the vLLM backend: {', '.join(blocked)}; "
            "load the model without backend='vllm' (veridical's own engine runs every method); "
            f"vLLM runs {', '.join(vllm_methods())} and their '+' compositions")


@dataclass
class _Member:
    request_id: str
    prompt: dict  # the vLLM prompt first submitted
    tokens: list[int] = field(default_factory=list)  # this submission's output so far
    prompt_ids: list[int] | None = None


@dataclass(eq=False)  # compared by identity (the waiting queue's membership and removal)
class _Group:
    index: int  # the veridical request's index
    seed: int
    prompts: list[dict]  # one vLLM prompt per member (role order)
    tokens: list[int] = field(default_factory=list)  # tokens every member emitted together
    logprobs: list[Any] = field(default_factory=list)
    members: list[_Member] = field(default_factory=list)
    key: str = ""
    offset: int = 0  # len(tokens) when the members were last submitted
    regroups: int = 0
    prompt_ids: list[int] | None = None  # the real input's prompt ids (first submission)
    need: tuple[int, int, int] = (0, 0, 0)  # (requests, KV tokens, longest prompt): vLLM.need


class VLLMEngine:
    """See the module docstring."""

    backend = "vllm"
    # The engine's own argument handling and validation (they call only request/run/stream).
    generate = Engine.generate
    request = Engine.request
    run = Engine.run
    check_context = Engine.check_context  # reads context_length below

    def __init__(self, llm: Any, processor: Any, adapter: Any, hf_config: Any, name: str,
                 eos_ids: list[int], in_process: bool) -> None:
        self.llm = llm
        self.core = llm.llm_engine
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.adapter = adapter
        self.hf_config = hf_config
        self.name = name
        self.eos_ids = eos_ids
        self.in_process = in_process
        self.head_profile = None
        self.stats = {"regrouped": 0}
        # the latest output of each request that others added to ``core`` and our calls stepped
        self.others: dict[str, Any] = {}
        self.request_ids = itertools.count()
        self.image_token_id = adapter.image_token_id(hf_config)

    @property
    def multimodal(self) -> bool:
        return bool(self.adapter.multimodal)

    @property
    def context_length(self) -> int:
        """vLLM's ``max_model_len``: prompt and new tokens together."""
        return int(self.core.vllm_config.model_config.max_model_len)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def unsupported(self, method: Method) -> str | None:
        return unsupported_reason(method)

    def stream(self, requests: list[Request], method: Method, config: DecodingConfig,
               seeds: list[int | None], admit: Any = None) -> EventStream:
        reason = self.unsupported(method)
        if reason is not None:
            raise InputError(reason)
        if config.num_beams > 1:
            raise InputError("beam search is not available on the vLLM backend (its groups "
                             "decode one token per step); use num_beams=1, or load the model "
                             "without backend='vllm'")
        if config.logprobs is not None and not self.in_process:
            raise InputError("logprobs of the combined scores need vLLM's engine in this "
                             "process; with tensor or pipeline parallelism leave logprobs unset")
        given = [fresh_seed() if s is None else s for s in seeds]
        return EventStream(lambda cancelled: _events(self, requests, method, config, given,
                                                     admit, cancelled))

    # Building the members of a group --------------------------------------------------------------
    def prompts(self, request: Request, method: Method, seed: int) -> list[dict]:
        """The vLLM prompts of ``request``'s group: the real input, then each branch's, built
        as the engine builds its rows (``Engine.branch_rows``)."""
        out = [self._prompt(request)]
        for branch in method.branches():
            rng = torch.Generator().manual_seed(derive_seed(seed, "branch", branch_key(branch.name)))
            made = branch.make(request, rng)
            extra = None
            if branch.on_pixels is not None and made.image is not None:
                owner, _, own = branch.name.rpartition(".")
                extra = plugin.pixels_argument(owner or method.name, _own_args(method, owner),
                                               own, rng)
            out.append(self._prompt(made, extra))
        return out

    def _prompt(self, request: Request, pixels: str | None = None) -> dict:
        prompt: dict[str, Any] = {"prompt": chat_text(self.processor, request.image,
                                                      request.prompt, request.system)}
        if request.image is not None:
            prompt["multi_modal_data"] = {"image": request.image}
        if pixels is not None:
            prompt["mm_processor_kwargs"] = {plugin.PIXELS_KEY: pixels}
        return prompt

    def capacity(self) -> tuple[int, float]:
        """(requests, KV-cache tokens) vLLM holds at once."""
        config = self.core.vllm_config
        blocks = config.cache_config.num_gpu_blocks
        tokens = blocks * config.cache_config.block_size if blocks else math.inf
        return config.scheduler_config.max_num_seqs, tokens

    def need(self, prompts: list[dict], max_new_tokens: int) -> tuple[int, int, int]:
        """(requests, KV-cache tokens in whole blocks, longest prompt) of a group with these
        prompts, at most."""
        block = self.core.vllm_config.cache_config.block_size or 1
        lengths = [self.prompt_length(prompt) for prompt in prompts]
        tokens = sum(-(-(n + max_new_tokens) // block) * block for n in lengths)
        return len(prompts), tokens, max(lengths)

    def prompt_length(self, prompt: dict) -> int:
        """Tokens of a vLLM prompt once its image placeholders are expanded (the processor's)."""
        if "prompt_token_ids" in prompt:
            return len(prompt["prompt_token_ids"])
        image = (prompt.get("multi_modal_data") or {}).get("image")
        if image is None or not hasattr(self.processor, "image_processor"):
            return len(self.tokenizer(prompt["prompt"])["input_ids"])
        out = self.processor(text=[prompt["prompt"]], images=[image], return_tensors="pt")
        return int(out["input_ids"].shape[-1])

    def resubmission(self, member: _Member, tokens: list[int]) -> dict:
        """``member``'s prompt as token ids with ``tokens`` appended; image placeholder runs are
        collapsed to one token, which vLLM expands again from the image."""
        ids = list(member.prompt_ids or [])
        if self.image_token_id is not None and "multi_modal_data" in member.prompt:
            ids = [t for i, t in enumerate(ids)
                   if not (t == self.image_token_id and i and ids[i - 1] == self.image_token_id)]
        prompt = {k: v for k, v in member.prompt.items() if k != "prompt"}
        prompt["prompt_token_ids"] = ids + tokens
        return prompt


def _own_args(method: Method, part_name: str) -> dict:
    """The arguments of ``method`` or of its part ``part_name`` (a composite's)."""
    if not part_name:
        return dict(method.args)
    part = next(p for p in method.parts if p.name == part_name)
    return dict(part.args)


def _events(engine: VLLMEngine, requests: list[Request], method: Method, config: DecodingConfig,
            seeds: list[int], admit: Any, cancelled: set[int]) -> Iterator[Event]:
    from vllm import SamplingParams

    from . import combine

    core = engine.core
    size = len(method.branches()) + 1
    sampling = [config.temperature, config.top_k, config.top_p] if config.do_sample else None
    live: dict[int, _Group] = {}
    owner: dict[str, tuple[_Group, int]] = {}  # vLLM request id -> (group, role)
    count = itertools.count()

    def submit(group: _Group) -> None:
        group.key = f"v{next(engine.request_ids)}"
        group.offset = len(group.tokens)
        prompts = (group.prompts if not group.tokens else
                   [engine.resubmission(m, group.tokens) for m in group.members])
        old = group.members
        group.members = [None] * len(prompts)
        # Members that lagged at the last split go first: vLLM's first-come scheduling then
        # gives them the step's token budget, while the others' prompts are in the prefix cache;
        # otherwise a chunked prefill can split the same group again and again.
        order = sorted(range(len(prompts)), key=lambda r: len(old[r].tokens) if old else r)
        for role in order:
            prompt = prompts[role]
            tag = {"group": group.key, "role": role, "size": size, "method": method.name,
                   "args": dict(method.args), "offset": group.offset, "seed": group.seed,
                   "sample": sampling, "logprobs": config.logprobs}
            params = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens
                                    - group.offset, ignore_eos=True, detokenize=False,
                                    extra_args={combine.TAG: tag})
            rid = f"{group.key}-{role}"
            try:
                core.add_request(rid, prompt, params)  # outputs and aborts use this id
            except ValueError as exc:
                _abort(core, [m.request_id for m in group.members if m is not None])
                raise InputError(f"request {group.index}: vLLM refused it: {exc}") from None
            member = _Member(rid, old[role].prompt if old else prompt)
            member.prompt_ids = old[role].prompt_ids if old else None
            group.members[role] = member
            owner[rid] = (group, role)

    waiting: collections.deque[_Group] = collections.deque()  # groups not yet in vLLM
    running: set[int] = set()

    def start(request: Request, seed: int) -> None:
        index = next(count)
        group = _Group(index, seed, engine.prompts(request, method, seed))
        group.need = engine.need(group.prompts, config.max_new_tokens)
        budget = core.vllm_config.scheduler_config.max_num_batched_tokens
        if group.need[2] > budget:
            raise InputError(
                f"request {index}: a prompt of {group.need[2]} tokens does not fit vLLM's "
                f"per-step token budget ({budget}): its group's {size} requests could not be "
                "prefilled together; raise max_num_batched_tokens")
        cache = engine.capacity()[1]
        if group.need[1] > cache:
            raise InputError(
                f"request {index}: its {size} vLLM requests need {group.need[1]} tokens of KV "
                f"cache together, and the cache holds {cache}; lower "
                "max_new_tokens or give vLLM a larger KV cache (e.g. kv_cache_memory_bytes)")
        live[index] = group
        waiting.append(group)

    def pump() -> None:
        """Submit waiting groups while vLLM has room for all members of the next one: a group
        admitted whole, in a cache that holds it, is not split by admission or preemption."""
        seqs, tokens = engine.capacity()
        used_seqs = core.get_num_unfinished_requests()
        used_tokens = sum(live[i].need[1] for i in running)
        while waiting:
            group = waiting[0]
            fits = (used_seqs + group.need[0] <= seqs and used_tokens + group.need[1] <= tokens)
            if not fits and running:
                return
            waiting.popleft()
            running.add(group.index)
            used_seqs, used_tokens = used_seqs + group.need[0], used_tokens + group.need[1]
            submit(group)

    def release(group: _Group) -> None:
        _abort(core, [m.request_id for m in group.members])
        for m in group.members:
            owner.pop(m.request_id, None)
        combine.SIDE.pop(group.key, None)
        running.discard(group.index)

    def finish(group: _Group, reason: str) -> DoneEvent:
        release(group)
        if group in waiting:
            waiting.remove(group)
        del live[group.index]
        text, stopped = final_text(engine.tokenizer, group.tokens, config.stop)
        ids = group.prompt_ids or []
        images = sum(t == engine.image_token_id for t in ids) if engine.image_token_id is not None else 0
        return DoneEvent(group.index, GenerationResult(
            text, list(group.tokens), "stop" if stopped else reason, len(ids),
            len(group.tokens), images, list(group.logprobs) if config.logprobs is not None
            else None, group.seed))

    for request, seed in zip(requests, seeds):
        start(request, seed)
    try:
        while True:
            if admit is not None:
                for request, seed in admit(len(live)) or []:
                    start(request, fresh_seed() if seed is None else seed)
            if not live:
                return
            for index in [i for i in cancelled if i in live and live[i] in waiting]:
                yield finish(live[index], "cancelled")
            pump()
            if not running:
                continue
            touched: dict[int, _Group] = {}
            for out in core.step():
                hit = owner.get(out.request_id)
                if hit is None:  # a request someone else added to this vLLM engine
                    engine.others[out.request_id] = out
                    continue
                group, role = hit
                member = group.members[role]
                member.tokens = list(out.outputs[0].token_ids)
                if member.prompt_ids is None:
                    member.prompt_ids = list(out.prompt_token_ids or [])
                    if role == 0:
                        group.prompt_ids = member.prompt_ids
                touched[group.index] = group
            for group in touched.values():
                counts = [len(m.tokens) for m in group.members]
                common = min(counts)
                seen = len(group.tokens) - group.offset  # this submission's tokens checked before
                if len({tuple(m.tokens[seen:common]) for m in group.members}) != 1:
                    raise RuntimeError(f"request {group.index}: the members of its vLLM group "
                                       "emitted different tokens; this is a bug in veridical")
                new = group.members[0].tokens[seen:common]
                side = combine.SIDE.get(group.key, {})
                done = None
                for token in new:
                    step = len(group.tokens)
                    group.tokens.append(token)
                    entry = side.pop(step, None) if config.logprobs is not None else None
                    if config.logprobs is not None:
                        group.logprobs.append(entry)
                    yield TokenEvent(group.index, token, entry)
                    done = finish_reason(group.tokens, engine.eos_ids, engine.tokenizer, config)
                    if group.index in cancelled:
                        done = done or "cancelled"
                    if done is not None:
                        break
                if done is not None:
                    yield finish(group, done)
                elif max(counts) > common:  # the group came apart: regroup from `common`
                    group.regroups += 1
                    engine.stats["regrouped"] += 1
                    if group.regroups > MAX_REGROUPS:
                        finish(group, "cancelled")
                        raise RuntimeError(
                            f"request {group.index}: vLLM split its {size} requests "
                            f"{MAX_REGROUPS} times (scheduling under memory or token-budget "
                            "pressure); raise max_num_seqs, max_num_batched_tokens or the KV "
                            "cache size, or send fewer requests at once")
                    release(group)
                    waiting.appendleft(group)  # first in line: it is older than the rest
    finally:
        _abort(core, [rid for rid in owner])


def _abort(core: Any, ids: list[str]) -> None:
    if ids:
        core.abort_request(ids)


def load_vllm(ref: str, **vllm_args: Any) -> VLLMEngine:
    """Load ``ref`` (a model folder, ``builtin:<name>``, or a hub id) into vLLM with veridical's
    combiner and plugin; ``vllm_args`` pass through to ``vllm.LLM`` (e.g.
    ``tensor_parallel_size``, ``max_model_len``, ``gpu_memory_utilization``)."""
    from transformers import AutoConfig, GenerationConfig

    from veridical.adapters import adapter_for
    from veridical.loading import builtin_path
    from veridical.processing import load_processor

    from .convert import vllm_folder

    if ref.startswith("tiny-random:"):
        raise InputError(
            f"{ref!r} is built in memory with 16-wide attention heads, which vLLM's CPU "
            "attention refuses; save a tiny model with veridical.tiny.save_tiny(arch, folder, "
            "head_dim=32) and load the folder")
    name = ref
    if ref.startswith("builtin:"):
        ref = str(builtin_path(ref))
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise InputError("vLLM is not installed: pip install 'veridical[vllm]' on a GPU machine, "
                         "or build the CPU environment with `make test-vllm`") from None
    folder = Path(ref).expanduser()
    source = str(vllm_folder(folder)) if folder.is_dir() else ref
    hf_config = AutoConfig.from_pretrained(source)
    parallel = int(vllm_args.get("tensor_parallel_size", 1)) * int(
        vllm_args.get("pipeline_parallel_size", 1))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the combiner in this process
    # vLLM 0.32's GPU model runner V2 takes no custom logits processors; keep the V1 runner.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    plugin.register()
    args = dict(vllm_args)
    arch = plugin.architecture((hf_config.architectures or [""])[0])
    if arch is not None:
        overrides = dict(args.pop("hf_overrides", None) or {})
        overrides.setdefault("architectures", [arch])
        args["hf_overrides"] = overrides
    args["logits_processors"] = [*args.get("logits_processors", []), COMBINER]
    # Branch pixel transforms (VCD's noise) act on the processor's NORMALISED pixels, as in the
    # engine; vLLM can otherwise defer Qwen-VL's normalisation to the GPU.
    args.setdefault("mm_device_do_normalize", False)
    args.setdefault("seed", 0)
    if not torch.cuda.is_available():
        # vLLM would drop this whole process to one torch thread unless told the count
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        args.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        args.setdefault("dtype", "float32")  # vLLM's CPU default is bfloat16; ours is float32
    from vllm import LLM

    llm = LLM(model=source, **args)
    processor = load_processor(source)
    try:
        gen = GenerationConfig.from_pretrained(source)
    except OSError:  # a folder without generation_config.json
        gen = None
    eos = eos_token_ids(gen, getattr(processor, "tokenizer", processor))
    in_process = parallel == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    return VLLMEngine(llm, processor, adapter_for(hf_config), hf_config, name, eos, in_process)

