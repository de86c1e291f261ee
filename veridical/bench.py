"""Benchmarks that print ratios measured side by side in one run (never timed tests).

``bench_engine``: tokens per second of ``Engine.generate`` and of transformers'
``model.generate`` on the same model, requests and batch sizes, greedy.
``bench_methods``: per-token time of every registered method (at its defaults) divided by the
baseline's, on the same model, requests and batch sizes, greedy; search strategies (OPERA, 5
beams) also against our beam search with 5 beams. Besides the whole call's time per token, it
splits the call: the first token (prefill, plus a method's own set-up forwards such as VHR's
text-only prefill), timed by a run with ``max_new_tokens=1``, and the decoding after it, per
token. The decoding is timed inside each call from the tokens' timestamps (``on_token``): from
the moment every request has its first token to the last token, over the tokens in between. Its
ratio is the median, over the rounds, of the ratio of the two calls that ran back to back in that
round. Searches that know their tokens only at the end (beam search, OPERA) have no timestamps;
for them, and for their ratios, the decoding is ``(t_full - t_first) / (n_full - n_first)`` from
the best times (``decode_timing: "split"`` in the rows; ``"timestamps"`` otherwise). Every row
also carries that split estimate as ``decode_per_token_ratio_split``, to compare the two.
Both alternate the contenders several times (so that the machine's drift hits all alike); the
whole-call and first-token times are each contender's best.

``bench_backends`` (``veridical bench backends``): the same workload (POPE-style yes/no questions
and captions) on three contenders, side by side:

- ``reference``: the loop the reference research repositories run (VCD's and its kin): batch
  size 1, one request at a time; the HF model called directly, one forward per branch per step,
  each branch with its own KV cache; the method's combination, then a greedy argmax; it stops at
  EOS or ``max_new_tokens``. Branch inputs come from the engine's own code (``branch_rows``), so
  the tokens can be compared exactly. It runs methods made of branches and a logits combination
  only (none, vcd, icd, ritual, ...): hooks, attention edits and searches are the engine's.
- ``engine``: ``Engine.stream`` (what ``Engine.generate`` runs) on the requests in chunks of each
  batch size.
- ``vllm``: ``veridical.load(ref, backend="vllm")``, called like the engine (its ``stream``, else
  its ``generate``); skipped, with the reason, when vLLM is missing or fails to load.

Per (contender, method, batch size, task): the best wall time over ``repeats`` rounds that
alternate the contenders after one warm-up each (``alternate``), the tokens generated, tokens/s
and its ratio to the reference's, the mean time to first token (from the start of the call that
serves the request: the reference's per-request loop, or the batch's call), the peak memory above
the start of the call (``PeakMemory``), the contender's load time, and whether its token ids equal
the engine's at the first batch size, request by request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from .decoding.attention import text_attention
from .decoding.config import DecodingConfig
from .decoding.inputs import collate, encode
from .decoding.registry import resolve
from .errors import InputError

logger = logging.getLogger(__name__)

PROMPTS = (
    "describe this image in detail .",
    "what is in the image ?",
    "is there a cup in the image ?",
    "how many objects are there ?",
)


def bench_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _engine_tokens(engine, images, prompts, max_new_tokens: int) -> int:
    results = engine.generate(images, prompts, max_new_tokens=max_new_tokens)
    return sum(r.completion_tokens for r in results)


def _hf_tokens(engine, images, prompts, max_new_tokens: int) -> int:
    rows = [encode(engine.processor, i, p) for i, p in zip(images, prompts)]
    batch = {k: v.to(engine.device) for k, v in collate(rows, engine.pad_id).items()}
    with torch.inference_mode():
        out = engine.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[:, batch["input_ids"].shape[1] :]
    # generated tokens up to and including EOS (the rest is padding)
    is_eos = torch.isin(new, torch.tensor(engine.eos_ids or [-1], device=new.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return int((~after_eos).sum())


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[tuple[float, Any]]]:
    """Each function's ``(wall time, result)`` per round: one warm-up each, then ``repeats``
    rounds that run them in turn."""
    for fn in fns.values():
        fn()
    calls: dict[str, list[tuple[float, Any]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            calls[name].append((time.perf_counter() - start, result))
    return calls


def time_alternating(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Best wall time of each function, run in turns after one warm-up each, and what that call
    returned (a token count)."""
    return _best(alternate(fns, repeats))


def _best(calls: dict[str, list[tuple[float, Any]]]) -> dict[str, tuple[float, Any]]:
    return {name: min(c, key=lambda call: call[0]) for name, c in calls.items()}


def bench_engine(engine, batch_sizes: list[int], max_new_tokens: int = 32,
                 repeats: int = 3) -> list[dict]:
    """One row per batch size: tokens/s of the engine and of HF generate, and their ratio."""
    rows = []
    for batch_size in batch_sizes:
        images = bench_images(batch_size)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        args = (engine, images, prompts, max_new_tokens)
        timed = time_alternating(
            {"engine": partial(_engine_tokens, *args), "hf": partial(_hf_tokens, *args)}, repeats
        )
        (t_ours, n_ours), (t_hf, n_hf) = timed["engine"], timed["hf"]
        rows.append({
            "batch_size": batch_size,
            "engine_tokens_per_s": n_ours / t_ours,
            "hf_tokens_per_s": n_hf / t_hf,
            # engine time per token divided by HF's: below 1 means the engine is faster
            "time_ratio": (t_ours / n_ours) / (t_hf / n_hf),
            "engine_tokens": n_ours,
            "hf_tokens": n_hf,
        })
    return rows


def _method_call(engine, images, prompts, max_new_tokens: int, method: str = "none",
                 num_beams: int = 1, ignore_eos: bool = False) -> tuple[int, float | None]:
    """One call's generated tokens, and its decoding's seconds per token from the tokens'
    timestamps (module docstring); None when the search reports its tokens only at the end, or
    no request went past its first token."""
    name, args = method_spec(method)
    built = resolve(name, args)
    requests = [engine.request(image, prompt, i)
                for i, (image, prompt) in enumerate(zip(images, prompts))]
    stamps: list[float] = []

    def stamp(request: int, token: int, entry: Any) -> bool:
        stamps.append(time.perf_counter())
        return True

    results = engine.run(requests, built,
                         DecodingConfig(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                        ignore_eos=ignore_eos),
                         [None] * len(requests), on_token=stamp)
    tokens, n = sum(r.completion_tokens for r in results), len(requests)
    streams = num_beams == 1 and built.search() is None
    # the first n stamps are each request's first token, all after the prefill
    decode = ((stamps[-1] - stamps[n - 1]) / (len(stamps) - n)
              if streams and len(stamps) > n else None)
    return tokens, decode


def method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"pai:gamma=1:alpha=0.5"`` -> ``("pai", {"gamma": "1", "alpha": "0.5"})``: a method with
    parameters away from its defaults, as one benchmark contender."""
    name, *sets = spec.split(":")
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise InputError(f"method {spec!r}: {bad[0]!r} is not KEY=VALUE; write e.g. "
                         "pai:gamma=1")
    return name.strip(), dict(s.split("=", 1) for s in sets)


def applicable_methods(engine) -> list[str]:
    """Registered methods this model can run at their defaults: ``scmoe`` needs MoE routers,
    ``var`` (``sink_dims=auto``) the model's head profile (``veridical heads profile``)."""
    from .decoding.registry import registered

    names = list(registered())
    if not engine.adapter.routers(engine.model):
        names = [n for n in names if n != "scmoe"]
    if engine.head_profile is None:
        logger.warning("%s has no head profile: var is left out (run veridical heads profile "
                       "--model %s to include it)", engine.name, engine.name)
        names = [n for n in names if n != "var"]
    return names


def _eager_call(engine, images, prompts, max_new_tokens: int = 32, ignore_eos: bool = False
                ) -> tuple[int, float | None]:
    """The baseline with eager attention: the route the reference implementations force."""
    with text_attention(engine.model, "eager", engine.adapter.multimodal):
        return _method_call(engine, images, prompts, max_new_tokens, ignore_eos=ignore_eos)


def bench_methods(engine, batch_sizes: list[int], methods: list[str] | None = None,
                  max_new_tokens: int = 32, repeats: int = 3, ignore_eos: bool = False
                  ) -> list[dict]:
    """One row per (batch size, method): tokens/s and time per token relative to ``none``;
    ``none (eager)`` is the baseline on eager attention, the references' route.
    ``ignore_eos``: every request decodes ``max_new_tokens`` tokens, so that methods that change
    the answers' lengths are timed on the same batch widths; searches (OPERA) are left out
    (they end beams at EOS)."""
    methods = ["none", *[m for m in (methods or applicable_methods(engine)) if m != "none"]]
    if ignore_eos:
        methods = [m for m in methods if not _is_search(m)]
    rows = []
    for batch_size in batch_sizes:
        images = bench_images(batch_size)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        fns: dict = {}
        contenders = {m: partial(_method_call, engine, images, prompts, method=m,
                                 ignore_eos=ignore_eos) for m in methods}
        contenders["none (eager)"] = partial(_eager_call, engine, images, prompts,
                                             ignore_eos=ignore_eos)
        searches = [m for m in methods if _is_search(m)]
        if searches:  # OPERA is a beam search: also compare with ours at its beams
            contenders[BEAM] = partial(_method_call, engine, images, prompts, method="none",
                                       num_beams=5)
        for name, fn in contenders.items():
            fns[name] = partial(fn, max_new_tokens=max_new_tokens)
            fns[(name, "first")] = partial(fn, max_new_tokens=1)
        calls = alternate(fns, repeats)
        timed = _best(calls)

        base = _split(timed, "none")
        for name in contenders:
            per_token, first, _ = _split(timed, name)
            t, (n, _) = timed[name]
            decode, how = _decode_ratio(calls, timed, name, "none")
            row = {"batch_size": batch_size, "method": name, "tokens_per_s": n / t,
                   "tokens": n, "time_per_token_ratio": per_token / base[0],
                   "first_token_ratio": first / base[1], "decode_per_token_ratio": decode,
                   "decode_timing": how,
                   # the split estimator for every contender, to compare the two
                   "decode_per_token_ratio_split": _split_ratio(timed, name, "none")}
            if name in searches:
                beam = _split(timed, BEAM)
                row["time_per_token_vs_beam"] = per_token / beam[0]
                row["decode_per_token_vs_beam"] = _decode_ratio(calls, timed, name, BEAM)[0]
            rows.append(row)
    return rows


BEAM = "none (beam search, 5 beams)"


def _is_search(method: str) -> bool:
    return resolve(*method_spec(method)).search() is not None


def _split(timed: dict, name: str) -> tuple[float, float, float | None]:
    """From the best times: (time per token of the call, first-token time, decode time per
    later token; None when there is no later token, or when the machine's noise exceeded the
    decoding's time)."""
    (t, (n, _)), (t1, (n1, _)) = timed[name], timed[(name, "first")]
    return t / n, t1, ((t - t1) / (n - n1) if n > n1 and t > t1 else None)


def _decode_ratio(calls: dict, timed: dict, name: str, base: str
                  ) -> tuple[float | None, str]:
    """``name``'s decoding time per token over ``base``'s and how it was timed: the median
    over rounds of the ratio of their timestamp rates when both stream their tokens, else from
    the best times (``_split``)."""
    pairs = [(a[1][1], b[1][1]) for a, b in zip(calls[name], calls[base])]
    if pairs and all(x is not None and y is not None for x, y in pairs):
        return float(np.median([x / y for x, y in pairs])), "timestamps"
    return _split_ratio(timed, name, base), "split"


def _split_ratio(timed: dict, name: str, base: str) -> float | None:
    """``name``'s decode time per token over ``base``'s, both from the best times."""
    decode, base_decode = _split(timed, name)[2], _split(timed, base)[2]
    return decode / base_decode if decode and base_decode else None


# ------------------------------------------------------------------ veridical bench backends

BACKENDS = ("reference", "engine", "vllm")
BACKENDS_MODEL = "builtin:synthcoco-llava"
POPE_MAX_NEW_TOKENS = 16  # POPE answers are a word: the cap ``veridical eval pope`` uses
VLLM_MISSING = ("vLLM is not installed in this environment: run `make test-vllm` to build "
                ".venv-vllm, then run this command with .venv-vllm/bin/veridical")


@dataclass
class Task:
    """One part of the workload: requests (an image and a prompt each) and their token cap."""

    name: str
    images: list
    prompts: list[str]
    max_new_tokens: int


@dataclass
class Outcome:
    """One contender's call on a task: token ids and seconds to the first token per request
    (None when the backend reports no tokens before the end), and peak memory in bytes."""

    tokens: list[list[int]]
    first_token_s: list[float | None]
    peak_bytes: int | None


def backends_workload(captions: int = 16, questions: int = 16, max_new_tokens: int = 32,
                      data: str = "builtin:synthcoco") -> list[Task]:
    """The first ``captions`` CHAIR images with the CHAIR prompt (``max_new_tokens``) and the
    first ``questions`` POPE questions of the random split (``min(max_new_tokens,
    POPE_MAX_NEW_TOKENS)``), from the built-in SynthCOCO world's test split, images loaded."""
    from .evals.runner import EvalConfig, chair_benchmark, limit_items, pope_benchmark
    from .images import load_image
    from .world import resolve_data

    folder = resolve_data(data)
    tasks = []
    if captions:
        items = chair_benchmark(EvalConfig("chair", "", folder, "", num_images=captions)).items
        tasks.append(Task("caption", [load_image(it.image()) for it in items],
                          [it.prompt for it in items], max_new_tokens))
    if questions:
        items = pope_benchmark(EvalConfig("pope", "", folder, "", split="random")).items
        items = limit_items(items, questions)
        tasks.append(Task("pope", [load_image(it.image()) for it in items],
                          [it.prompt for it in items], min(max_new_tokens, POPE_MAX_NEW_TOKENS)))
    return tasks


def reference_unsupported(method) -> str | None:
    """Why the reference loop cannot run ``method`` (hooks, attention edits, per-request
    preparation or a search of its own), or None."""
    from .decoding.method import Method

    for part in getattr(method, "parts", None) or [method]:
        own = [name for name in ("install", "prepare", "attention_edits")
               if getattr(type(part), name) is not getattr(Method, name)]
        if own or part.search() is not None:
            return (f"the reference loop runs branches and a logits combination only; "
                    f"{part.name} also needs {', '.join(own) or 'its own search'}")
    return None


@torch.inference_mode()
def reference_generate(engine, request, method, max_new_tokens: int, seed: int
                       ) -> tuple[list[int], float]:
    """The reference repositories' loop for one request (module docstring), greedy: its token
    ids and the seconds from the start (encoding included) to its first token."""
    start = time.perf_counter()
    model, ctx = engine.model, engine.context()
    branches = method.branches()
    names = [branch.name for branch in branches]
    rows = [ctx.encode(request), *engine.branch_rows([request], branches, [seed])]
    logits, caches, masks = [], [], []
    for row in rows:
        inputs = {k: v.to(model.device) for k, v in row.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model(**inputs, use_cache=True)
        logits.append(out.logits[:, -1, :].float())
        caches.append(getattr(out, "cache", None) or out.past_key_values)
        masks.append(inputs["attention_mask"])
    tokens: list[int] = []
    first = 0.0
    while True:
        scores = method.combine(logits[0], dict(zip(names, logits[1:])), len(tokens))
        tokens.append(int(scores.argmax(dim=-1)))
        if len(tokens) == 1:
            first = time.perf_counter() - start
        if tokens[-1] in engine.eos_ids or len(tokens) >= max_new_tokens:
            return tokens, first
        next_ids = torch.tensor([[tokens[-1]]], device=model.device)
        for b in range(len(rows)):  # one forward per branch, each on its own cache
            masks[b] = torch.cat([masks[b], masks[b].new_ones(1, 1)], dim=-1)
            # past_key_values=..., named as this transformers version wants it (``cache``)
            out = model(input_ids=next_ids, attention_mask=masks[b], use_cache=True,
                        **{engine.cache_kw: caches[b]})
            logits[b] = out.logits[:, -1, :].float()
            caches[b] = getattr(out, "cache", None) or out.past_key_values


class PeakMemory:
    """Context manager: ``peak`` is the most memory in use above the level at entry, in bytes.
    On CUDA: ``torch.cuda.max_memory_allocated`` (its peak reset at entry), this process's
    tensors only. On CPU: the resident set size, sampled every ``interval`` seconds by a
    background thread (psutil when installed, else /proc/self/statm); None where neither works."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.cuda = torch.device(device).type == "cuda"
        self.interval = interval
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.top = _rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            self.top = max(self.top, _rss() or 0) if self.top is not None else None

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self.done.set()
        self.thread.join()
        if self.start is not None and self.top is not None:
            self.peak = max(self.top, _rss() or 0) - self.start


def memory_measure(device: torch.device) -> str:
    """What ``PeakMemory`` measures on ``device``, in words."""
    if torch.device(device).type == "cuda":
        return ("CUDA peak allocated by this process above the start of each call "
                "(torch.cuda.max_memory_allocated; vLLM's engine process is not seen)")
    source = "psutil" if _psutil() is not None else "/proc/self/statm"
    return f"CPU peak resident memory above the start of each call ({source}, sampled every 5 ms)"


@cache
def _psutil() -> Any:
    """This process in psutil, or None when psutil is not installed."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process()


def _rss() -> int | None:
    process = _psutil()
    if process is not None:
        return process.memory_info().rss
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reference_call(engine, task: Task, method: str, seed: int) -> Outcome:
    """Every request of ``task`` through :func:`reference_generate`, one at a time."""
    tokens, firsts = [], []
    with PeakMemory(engine.device) as memory:
        for i, (image, prompt) in enumerate(zip(task.images, task.prompts)):
            built = resolve(*method_spec(method))
            ids, first = reference_generate(engine, engine.request(image, prompt, i), built,
                                            task.max_new_tokens, seed)
            tokens.append(ids)
            firsts.append(first)
    return Outcome(tokens, firsts, memory.peak)


def _backend_call(backend, engine, task: Task, method: str, seed: int, batch_size: int
                  ) -> Outcome:
    """``task``'s requests through ``backend`` in chunks of ``batch_size``: its ``stream`` (the
    engine's ``generate`` runs it) on requests checked by ``engine.request``, timing each
    request's first token from its chunk's start; a backend without ``stream`` goes through
    ``generate`` (no first-token times)."""
    from .decoding.config import DecodingConfig, TokenEvent

    name, args = method_spec(method)
    tokens, firsts = [], []
    with PeakMemory(backend.device) as memory:
        for at in range(0, len(task.prompts), batch_size):
            images = task.images[at : at + batch_size]
            prompts = task.prompts[at : at + batch_size]
            start = time.perf_counter()
            if not hasattr(backend, "stream"):
                results = backend.generate(images, prompts, method=name, method_args=args,
                                           max_new_tokens=task.max_new_tokens, seed=seed)
                tokens += [r.token_ids for r in results]
                firsts += [None] * len(results)
                continue
            requests = [engine.request(im, p, at + i)
                        for i, (im, p) in enumerate(zip(images, prompts))]
            stream = backend.stream(requests, resolve(name, args),
                                    DecodingConfig(max_new_tokens=task.max_new_tokens),
                                    [seed] * len(requests))
            first: dict[int, float] = {}
            done: dict[int, list[int]] = {}
            for event in stream:
                if isinstance(event, TokenEvent):
                    first.setdefault(event.request, time.perf_counter() - start)
                else:
                    done[event.request] = event.result.token_ids
            tokens += [done[i] for i in range(len(requests))]
            firsts += [first.get(i) for i in range(len(requests))]
    return Outcome(tokens, firsts, memory.peak)


def load_vllm(ref: str, device: str | None = None) -> tuple[Any, float, str | None]:
    """``(backend, load seconds, None)``, or ``(None, 0, why)`` when vLLM is not importable or
    the vLLM backend fails to load ``ref``."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return None, 0.0, VLLM_MISSING
    import veridical

    start = time.perf_counter()
    try:
        backend = veridical.load(ref, backend="vllm",
                                 **({"device": device} if device is not None else {}))
    except Exception as exc:  # any failure of an optional backend is reported, not raised
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, 0.0, f"the vLLM backend failed to load {ref}: {first_line}"
    return backend, time.perf_counter() - start, None


def device_name(device: torch.device) -> str:
    """``cpu`` or the GPU's name."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def bench_backends(ref: str, tasks: list[Task], contenders: Sequence[str] = BACKENDS,
                   methods: Sequence[str] = ("none", "vcd"), batch_sizes: Sequence[int] = (1, 16),
                   repeats: int = 3, seed: int = 0, device: str | None = None) -> dict:
    """The contenders (``BACKENDS``) side by side on ``tasks`` (see above). Returns
    ``{"model", "device", "memory_measure", "torch_threads", "repeats", "seed", "rows",
    "checks"}``: one row per (contender, method, batch size, task), the reference at batch size
    1; a contender that cannot run (vLLM missing, a method it lacks) gets rows with ``skipped``
    (the reason) and no measures. ``checks``: per (method, task), whether every contender that
    ran gave the engine's token ids (at the first batch size; the reference's when the engine
    is not a contender), and how many requests differ per contender."""
    import veridical

    start = time.perf_counter()
    engine = veridical.load(ref, device=device)
    loads: dict[str, float] = {"engine": time.perf_counter() - start}
    loads["reference"] = loads["engine"]  # the same model, loaded once
    backends: dict[str, Any] = {"reference": engine, "engine": engine}
    skipped: dict[str, str] = {}
    if "vllm" in contenders:
        backends["vllm"], loads["vllm"], why = load_vllm(ref, device)
        if why:
            skipped["vllm"] = why
    sizes = {"reference": [1], "engine": list(batch_sizes), "vllm": list(batch_sizes)}
    rows, checks = [], []
    for method in methods:
        built = resolve(*method_spec(method))
        cannot = dict(skipped)
        if "reference" in contenders and reference_unsupported(built):
            cannot["reference"] = reference_unsupported(built)
        if "vllm" in contenders and "vllm" not in cannot and backends["vllm"].unsupported(built):
            cannot["vllm"] = backends["vllm"].unsupported(built)
        for task in tasks:
            fns: dict = {}
            for who in contenders:
                for size in sizes[who]:
                    if who in cannot:
                        rows.append(_skipped_row(who, method, task, size, cannot[who]))
                    elif who == "reference":
                        fns[who, size] = partial(_reference_call, engine, task, method, seed)
                    else:
                        fns[who, size] = partial(_backend_call, backends[who], engine, task,
                                                 method, seed, size)
            if not fns:
                continue
            best = _best(alternate(fns, repeats))
            base_key = (("engine", batch_sizes[0]) if ("engine", batch_sizes[0]) in best
                        else next(iter(best)))
            base = best[base_key][1].tokens
            ran = []
            for (who, size), (seconds, outcome) in best.items():
                n = sum(len(t) for t in outcome.tokens)
                firsts = [f for f in outcome.first_token_s if f is not None]
                differ = sum(a != b for a, b in zip(outcome.tokens, base))
                ran.append({
                    "contender": who, "method": method, "task": task.name, "batch_size": size,
                    "requests": len(task.prompts), "max_new_tokens": task.max_new_tokens,
                    "seconds": seconds, "tokens": n, "tokens_per_s": n / seconds,
                    "first_token_s": sum(firsts) / len(firsts) if firsts else None,
                    "peak_memory_mb": (None if outcome.peak_bytes is None
                                       else outcome.peak_bytes / 2**20),
                    "load_s": loads[who], "tokens_match": differ == 0,
                    "mismatched_requests": differ, "skipped": None,
                })
            reference = next((r["tokens_per_s"] for r in ran if r["contender"] == "reference"),
                             None)
            for row in ran:
                row["throughput_vs_reference"] = (row["tokens_per_s"] / reference
                                                  if reference else None)
            rows += ran
            checks.append({
                "method": method, "task": task.name, "against": f"{base_key[0]}@{base_key[1]}",
                "all_match": all(r["tokens_match"] for r in ran),
                "mismatched_requests": {f"{r['contender']}@{r['batch_size']}":
                                        r["mismatched_requests"] for r in ran},
            })
    return {"model": ref, "device": device_name(engine.device),
            "memory_measure": memory_measure(engine.device),
            "torch_threads": torch.get_num_threads(), "repeats": repeats, "seed": seed,
            "rows": rows, "checks": checks}


def _skipped_row(who: str, method: str, task: Task, size: int, why: str) -> dict:
    return {"contender": who, "method": method, "task": task.name, "batch_size": size,
            "requests": len(task.prompts), "max_new_tokens": task.max_new_tokens,
            "skipped": why}


def add_backends_bench(bench_subparsers: Any) -> None:
    """Register ``backends`` under ``veridical bench``."""
    parser = bench_subparsers.add_parser(
        "backends", help="the reference loop, the engine and vLLM on one workload, side by "
                         "side, with a check that they give the same tokens")
    parser.add_argument("--model", default=BACKENDS_MODEL, help="default: %(default)s")
    parser.add_argument("--methods", default="none,vcd",
                        help="comma list, greedy; NAME:KEY=VALUE sets a parameter (default: "
                             "%(default)s)")
    parser.add_argument("--batch-sizes", default="1,16",
                        help="the engine's and vLLM's batch sizes; the reference runs one "
                             "request at a time (default: %(default)s)")
    parser.add_argument("--captions", type=int, default=16,
                        help="CHAIR images to caption (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=16,
                        help="POPE questions, random split (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help=f"for captions; POPE answers get at most {POPE_MAX_NEW_TOKENS}, "
                             "as veridical eval pope (default: %(default)s)")
    parser.add_argument("--contenders", default=",".join(BACKENDS),
                        help="comma list (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds after one warm-up; each keeps its best "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="every request's seed (vcd's noise) (default: %(default)s)")
    parser.add_argument("--device", default=None, help="default: the model's own choice")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="also write the results as JSON")
    parser.set_defaults(func=cmd_bench_backends)


def _names(text: str, flag: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if allowed is not None and x not in allowed]
    if not values or bad or len(set(values)) != len(values):
        what = f"{bad[0]!r} is not one" if bad else "give a comma list without repeats"
        raise InputError(f"{flag} {text!r}: {what}"
                         + (f"; choose from {', '.join(allowed)}" if allowed else ""))
    return values


def _sizes(text: str) -> list[int]:
    try:
        values = [int(x) for x in _names(text, "--batch-sizes")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise InputError(f"--batch-sizes {text!r}: give positive integers such as 1,16")
    return values


def cmd_bench_backends(args: Any) -> int:
    import json
    from pathlib import Path

    contenders = _names(args.contenders, "--contenders", BACKENDS)
    methods = _names(args.methods, "--methods")
    for method in methods:
        resolve(*method_spec(method))  # an unknown method or parameter fails before any work
    sizes = _sizes(args.batch_sizes)
    if args.captions < 0 or args.questions < 0 or args.captions + args.questions == 0:
        raise InputError(f"--captions {args.captions} and --questions {args.questions}: give "
                         "counts >= 0, not both 0")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} and --repeats "
                         f"{args.repeats} must be >= 1")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise InputError(f"--output {args.output!r}: its folder does not exist")
    tasks = backends_workload(args.captions, args.questions, args.max_new_tokens)
    result = bench_backends(args.model, tasks, contenders, methods, sizes, args.repeats,
                            args.seed, args.device)
    print_backends(result, tasks)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"results: {Path(args.output).resolve()}")
    return 0


def print_backends(result: dict, tasks: list[Task]) -> None:
    """The rows as a table, then the tokens checks and what was skipped."""
    from rich.console import Console
    from rich.table import Table

    caps = ", ".join(f"{t.name} {len(t.prompts)} x {t.max_new_tokens}" for t in tasks)
    table = Table(title=f"veridical bench backends: {result['model']} on {result['device']}, "
                        f"greedy, seed {result['seed']}, requests x max new tokens: {caps}, "
                        f"best of {result['repeats']}, torch threads {result['torch_threads']}",
                  caption=f"vs ref: tokens/s over the reference's; 1st token: mean time to "
                          f"a request's first token from the start of its call; memory: "
                          f"{result['memory_measure']}; load: seconds to load (the reference "
                          "uses the engine's model)")
    heads = ("method", "task", "contender", "batch", "tok/s", "vs ref", "1st token ms", "wall s",
             "tokens", "peak MB", "load s", "= engine")
    for head in heads:
        table.add_column(head, justify="right")

    def num(x: float | None, form: str) -> str:
        return "-" if x is None else format(x, form)

    for r in result["rows"]:
        if r["skipped"]:
            continue
        table.add_row(r["method"], r["task"], r["contender"], str(r["batch_size"]),
                      num(r["tokens_per_s"], ".1f"),
                      num(r["throughput_vs_reference"], ".2f") + ("x" if
                                                                  r["throughput_vs_reference"]
                                                                  else ""),
                      num(r["first_token_s"] and r["first_token_s"] * 1000, ".1f"),
                      num(r["seconds"], ".2f"), str(r["tokens"]),
                      num(r["peak_memory_mb"], ".1f"), num(r["load_s"], ".1f"),
                      "yes" if r["tokens_match"] else f"no ({r['mismatched_requests']})")
    Console(width=200).print(table)
    for c in result["checks"]:
        differ = {k: v for k, v in c["mismatched_requests"].items() if v}
        print(f"tokens check, {c['method']} / {c['task']}: "
              + ("every contender gave the token ids of " + c["against"] if c["all_match"]
                 else f"differ from {c['against']}: "
                 + ", ".join(f"{k} in {v} requests" for k, v in differ.items())))
    for why in sorted({(r["contender"], r["method"], r["skipped"]) for r in result["rows"]
                       if r["skipped"]}):
        print(f"skipped: {why[0]} ({why[1]}): {why[2]}")
