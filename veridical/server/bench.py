"""``veridical bench serve``: throughput of the server under concurrent clients vs one at a time.

The same set of requests (``clients x requests_per_client`` chat completions, each with its own
random image as a data URL, greedy, ``max_tokens`` new tokens) is sent through a real uvicorn
server on 127.0.0.1, twice: by ``clients`` concurrent clients (each sending its share one after
the other), and sequentially by one client. The two runs alternate ``repeats`` times after a
warm-up and each keeps its best time (as ``veridical.bench`` does), so machine noise hits both
alike. Reported: requests/s and completion tokens/s of each, their ratio (target >= 3x with
8 clients), and how many requests one engine call served on average (continuous batching: the
requests that joined a running batch count in it). Clients and server share the process; the
clients are one asyncio loop of httpx.

Request ``i`` goes to client ``i % clients``, and the prompt kinds are spread so that every
client sends the same mix of them (long captions and one-word answers).

Beside it, in the same run, the batching gain inside the engine: the same requests straight
through ``Engine.run``, no HTTP, one at a time against continuous batching with ``clients`` rows
(the first ``clients`` start, each later one joins as a row leaves). The server's ratio can
exceed it: with concurrent clients it overlaps each request's HTTP work with the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import time
from typing import Any

DEFAULT_MODEL = "builtin:synthcoco-llava"
FALLBACK_MODEL = "tiny-random:llava"


def add_bench(bench_subparsers: Any) -> None:
    """Register ``serve`` under ``veridical bench``."""
    parser = bench_subparsers.add_parser(
        "serve", help="server throughput: concurrent clients vs the same requests one at a time")
    parser.add_argument("--model", default=None,
                        help=f"default: {DEFAULT_MODEL}, or {FALLBACK_MODEL} when not shipped")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="none", help="mitigation of every request")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is faster on a "
                             "busy machine)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import veridical
    from veridical.errors import InputError, VeridicalError

    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401

        from .app import create_app  # noqa: F401
    except ImportError as exc:
        raise VeridicalError(f"veridical bench serve needs {exc.name}; install the server "
                             "extra: pip install 'veridical[server]'") from None
    if args.clients < 1 or args.requests_per_client < 1 or args.repeats < 1:
        raise InputError("--clients, --requests-per-client and --repeats must be >= 1")
    if args.torch_threads is not None:
        import torch

        if args.torch_threads < 1:
            raise InputError(f"--torch-threads {args.torch_threads} must be >= 1")
        torch.set_num_threads(args.torch_threads)
    ref = args.model
    if ref is None:
        try:
            engine = veridical.load(DEFAULT_MODEL, device=args.device)
            ref = DEFAULT_MODEL
        except InputError:
            ref = FALLBACK_MODEL
            engine = veridical.load(ref, device=args.device)
    else:
        engine = veridical.load(ref, device=args.device)
    row = bench_serve(engine, ref, clients=args.clients,
                      requests_per_client=args.requests_per_client,
                      max_tokens=args.max_tokens, repeats=args.repeats, method=args.method)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"veridical serve, {ref}, {row['requests']} requests, greedy, "
                        f"max_tokens {args.max_tokens}, method {args.method}, "
                        f"torch threads {row['torch_threads']}")
    for col in ("clients", "requests/s", "completion tok/s", "requests per engine call"):
        table.add_column(col, justify="right")
    table.add_row("1 (sequential)", f"{row['sequential_requests_per_s']:.1f}",
                  f"{row['sequential_tokens_per_s']:.1f}", "1.0")
    table.add_row(f"{args.clients} (concurrent)", f"{row['concurrent_requests_per_s']:.1f}",
                  f"{row['concurrent_tokens_per_s']:.1f}", f"{row['mean_batch_size']:.1f}")
    Console().print(table)
    print(f"throughput ratio (concurrent / sequential): {row['ratio']:.2f}x (target >= 3x)")
    print(f"engine alone, no HTTP: {row['engine_sequential_requests_per_s']:.1f} requests/s one "
          f"at a time, {row['engine_continuous_requests_per_s']:.1f} with continuous batching "
          f"of {args.clients}: {row['engine_ratio']:.2f}x")
    return 0


def bench_serve(engine: Any, model_name: str, clients: int = 8, requests_per_client: int = 4,
                max_tokens: int = 32, repeats: int = 3, method: str = "none") -> dict[str, Any]:
    """Best-of-``repeats`` throughput of concurrent vs sequential clients (module docstring)."""
    import torch

    from veridical.bench import PROMPTS, bench_images

    from .app import create_app
    from .background import serve_in_thread
    from .settings import ServerSettings

    n = clients * requests_per_client
    # request i goes to client i % clients; shifting the prompt kind by i // clients gives each
    # client the same mix of kinds (a plain i % 4 would hand each of 8 clients one kind only,
    # and two of them every caption, one after the other)
    prompts = [PROMPTS[(i + i // clients) % len(PROMPTS)] for i in range(n)]
    bodies = []
    images = bench_images(n)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        bodies.append({
            "model": model_name, "max_tokens": max_tokens, "temperature": 0,
            "mitigation": {"method": method},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": prompts[i]}]}],
        })
    settings = ServerSettings(model=model_name, max_batch_size=clients,
                              max_queue_size=max(64, 2 * n), log_level="warning")
    app = create_app(engine, settings)
    with serve_in_thread(app) as url:
        async def run(concurrency: int) -> tuple[float, int]:
            return await _drive(url, bodies, concurrency)

        asyncio.run(run(clients))  # warm-up of both paths
        asyncio.run(run(1))
        stats = app.state.serving.batcher.stats
        best = {"concurrent": (float("inf"), 0), "sequential": (float("inf"), 0)}
        batches = jobs = 0  # of the concurrent runs
        for _ in range(repeats):
            for name, concurrency in (("concurrent", clients), ("sequential", 1)):
                before = (stats.batches, stats.completed + stats.failed)
                elapsed, tokens = asyncio.run(run(concurrency))
                if name == "concurrent":
                    batches += stats.batches - before[0]
                    jobs += stats.completed + stats.failed - before[1]
                if elapsed < best[name][0]:
                    best[name] = (elapsed, tokens)
    (t_c, n_c), (t_s, n_s) = best["concurrent"], best["sequential"]
    gain = engine_batching_gain(engine, images, prompts, clients, max_tokens, repeats, method)
    return {
        "model": model_name, "clients": clients, "requests": n, "max_tokens": max_tokens,
        "method": method,
        "concurrent_seconds": t_c, "sequential_seconds": t_s,
        "concurrent_requests_per_s": n / t_c, "sequential_requests_per_s": n / t_s,
        "concurrent_tokens_per_s": n_c / t_c, "sequential_tokens_per_s": n_s / t_s,
        "ratio": (n_c / t_c) / (n_s / t_s),
        "mean_batch_size": jobs / batches, "largest_batch": stats.largest_batch,
        "torch_threads": torch.get_num_threads(), **gain,
    }


def engine_batching_gain(engine: Any, images: list, prompts: list[str], slots: int,
                         max_tokens: int, repeats: int, method: str) -> dict[str, float]:
    """Requests/s of ``Engine.run`` alone: one request at a time, and batches of ``slots`` rows
    that waiting requests join as rows leave (module docstring; a method that takes no
    newcomers runs them ``slots`` at a time); best of ``repeats``, alternating."""
    from veridical import DecodingConfig, resolve
    from veridical.bench import time_alternating

    requests = [engine.request(image, prompt, i)
                for i, (image, prompt) in enumerate(zip(images, prompts))]
    config = DecodingConfig(max_new_tokens=max_tokens)

    def one_at_a_time() -> int:
        return len([engine.run([r], resolve(method), config, [None]) for r in requests])

    def batched() -> int:
        waiting = list(requests)

        def take(n: int) -> list:
            taken = waiting[:n]
            del waiting[:n]
            return taken

        done = 0
        while waiting:
            first = take(slots)
            done += len(engine.run(first, resolve(method), config, [None] * len(first),
                                   admit=lambda n_live: [(r, None) for r in
                                                         take(max(0, slots - n_live))]))
        return done

    timed = time_alternating({"one": one_at_a_time, "batched": batched}, repeats)
    (t_one, n_one), (t_batched, n_batched) = timed["one"], timed["batched"]
    if n_one != len(requests) or n_batched != len(requests):
        raise RuntimeError(f"engine batching gain: {n_one} and {n_batched} results for "
                           f"{len(requests)} requests")
    return {"engine_sequential_requests_per_s": n_one / t_one,
            "engine_continuous_requests_per_s": n_batched / t_batched,
            "engine_ratio": (n_batched / t_batched) / (n_one / t_one)}


async def _drive(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    """Send ``bodies`` with ``concurrency`` clients (each its share in turn); (seconds, tokens)."""
    import httpx

    shares = [bodies[i::concurrency] for i in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one_client(share: list[dict]) -> int:
            tokens = 0
            for body in share:
                response = await client.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"bench request failed: {response.status_code} "
                                       f"{response.text[:300]}")
                tokens += response.json()["usage"]["completion_tokens"]
            return tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(one_client(s) for s in shares))
        return time.perf_counter() - start, sum(counts)
