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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
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
