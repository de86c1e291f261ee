"""``veridical bench kernels``: the fused edited attention against the two things it replaces.

At LLaVA-1.5-7B's attention shapes (32 heads, head_dim 128, 576 image tokens after a 35-token
prefix), for decode (1 query) and prefill (as many queries as keys), per context length and edit:

- ``fused``: :func:`veridical.kernels.attention` with the edit, ``impl="triton"``;
- ``sdpa``: PyTorch SDPA without any edit (the speed an unedited model gets);
- ``eager``: eager attention with the edit (full logits, fp32 softmax, edit, ``weights @ v``), what
  the reference implementations of PAI/VAR/OPERA force.

Times are the best over rounds that alternate the contenders (CUDA events, each round the mean of
``--iters`` calls); memory is the peak allocated during one call beyond the inputs; a contender
that runs out of memory (eager prefill at large batch and context) is reported as ``oom``. Ratios are
printed side by side; the target is ``fused / sdpa <= 1.2`` with memory linear in the context.
It needs CUDA; ``--cpu-smoke`` runs tiny shapes on CPU (the fused column is then the torch
reference) so that tests can drive the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

from .reference import IMAGE, IMAGE_SINK, TEXT_SINK, VAR, Export, PreSoftmax, reweight_attention_

LLAVA_7B = {"heads": 32, "kv_heads": 32, "head_dim": 128, "image_start": 35, "image_tokens": 576}
SMOKE = {"heads": 2, "kv_heads": 1, "head_dim": 16, "image_start": 2, "image_tokens": 8}
EDITS = ("pai", "var", "pai+var", "opera")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers such as 1024,4096")
    return values


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in values if x not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return values
    return parse


def make_case(shape: dict, batch: int, mode: str, context: int, edit: str, dtype: torch.dtype,
              device: str, seed: int = 0) -> dict:
    """Inputs and edits of one benchmark case (random activations, LLaVA's token layout)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, Hkv, D = shape["heads"], shape["kv_heads"], shape["head_dim"]
    tq = 1 if mode == "decode" else context

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(batch, H, tq, D), rand(batch, Hkv, context, D), rand(batch, Hkv, context, D)
    start = min(shape["image_start"], context - 1)
    end = min(start + shape["image_tokens"], context)
    groups = torch.zeros(batch, context, dtype=torch.int8)
    groups[:, start:end] = IMAGE
    groups[:, 0] = TEXT_SINK  # BOS
    groups[:, [start + (end - start) // 3, start + 2 * (end - start) // 3]] = IMAGE_SINK
    groups = groups.to(device)
    image = (groups == IMAGE) | (groups == IMAGE_SINK)
    last = torch.zeros(batch, tq, dtype=torch.bool, device=device)
    last[:, -1] = True
    after_image = torch.zeros(batch, tq, dtype=torch.bool, device=device)
    after_image[:, max(0, end - (context - tq)):] = True  # VAR's prefill rows: text after image
    pre = var = export = None
    if "pai" in edit:
        pre = PreSoftmax(0.2, image, last)
    if "var" in edit:
        var = VAR(groups, rows=after_image)
    if edit == "opera":
        export = Export(last, max(0, context - 512), context)
    return {"q": q, "k": k, "v": v, "pre_softmax": pre, "var": var, "export": export}


def eager_edited(q, k, v, *, pre_softmax=None, var=None, export=None, causal=True):
    """Eager attention with the edit, as the reference implementations do it."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    tq, tk = q.shape[2], k.shape[2]
    w = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    if pre_softmax is not None:
        hit = pre_softmax.keys[:, None, None, :] & pre_softmax.rows[:, None, :, None]
        w = w + (pre_softmax.alpha * hit).to(w.dtype) * w.abs()
    if causal and tq > 1:
        hidden = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)
        w = w.masked_fill(hidden, torch.finfo(w.dtype).min)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    if var is not None:
        reweight_attention_(w, var.groups, p=var.p, rho=var.rho, summ=var.summ, rows=var.rows)
    probs = None
    if export is not None:
        probs = w[:, :, -1:, export.start:export.end].float()
    return torch.matmul(w, v).transpose(1, 2), probs


def _sdpa(q, k, v, causal=True):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=q.shape[1] != k.shape[1])


def _time_ms(fn: Callable[[], object], iters: int, cuda: bool) -> float:
    if cuda:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _peak_mib(fn: Callable[[], object], cuda: bool) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _runs(fn: Callable[[], object]) -> bool:
    """Warm-up call (compilation, SDPA backend choice); False when it runs out of memory."""
    try:
        fn()
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def bench_kernels(modes: list[str], contexts: list[int], edits: list[str], batches: list[int],
                  dtype: torch.dtype, rounds: int, iters: int, cpu_smoke: bool = False
                  ) -> list[dict]:
    """One row per (mode, batch, context, edit): ms and peak MiB of fused, sdpa and eager, and
    the ratios to sdpa (None where a contender ran out of memory)."""
    from . import attention

    cuda = not cpu_smoke
    device = "cuda" if cuda else "cpu"
    shape = SMOKE if cpu_smoke else LLAVA_7B
    impl = "triton" if cuda else "torch"
    rows = []
    for mode in modes:
        for batch in batches:
            for context in contexts:
                for edit in edits:
                    case = make_case(shape, batch, mode, context, edit, dtype, device)
                    tensors = (case["q"], case["k"], case["v"])
                    edit_kw = {n: case[n] for n in ("pre_softmax", "var", "export")}
                    fns = {
                        "fused": lambda t=tensors, e=edit_kw: attention(*t, impl=impl, **e),
                        "sdpa": lambda t=tensors: _sdpa(*t),
                        "eager": lambda t=tensors, e=edit_kw: eager_edited(*t, **e),
                    }
                    fns = {name: fn for name, fn in fns.items() if _runs(fn)}
                    best = dict.fromkeys(fns, float("inf"))
                    for _ in range(rounds):
                        for name, fn in fns.items():
                            best[name] = min(best[name], _time_ms(fn, iters, cuda))
                    row = {"mode": mode, "context": context, "edit": edit, "batch": batch,
                           "dtype": str(dtype).removeprefix("torch."),
                           "device": _device_name(cuda)}
                    for name in ("fused", "sdpa", "eager"):
                        row[f"{name}_ms"] = best.get(name)
                        row[f"{name}_mib"] = _peak_mib(fns[name], cuda) if name in fns else None
                    for name in ("fused", "eager"):
                        row[f"{name}_vs_sdpa"] = (best[name] / best["sdpa"]
                                                  if name in best and "sdpa" in best else None)
                    rows.append(row)
                    del case, tensors, edit_kw, fns
                    if cuda:
                        torch.cuda.empty_cache()
    return rows


def _device_name(cuda: bool) -> str:
    return torch.cuda.get_device_name() if cuda else "cpu (smoke)"


def _num(x: float | None, fmt: str) -> str:
    return "oom" if x is None else format(x, fmt)


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = [
        ("mode", lambda r: r["mode"]), ("batch", lambda r: str(r["batch"])),
        ("context", lambda r: str(r["context"])), ("edit", lambda r: r["edit"]),
        ("fused ms", lambda r: _num(r["fused_ms"], ".3f")),
        ("sdpa ms", lambda r: _num(r["sdpa_ms"], ".3f")),
        ("eager ms", lambda r: _num(r["eager_ms"], ".3f")),
        ("fused/sdpa", lambda r: _num(r["fused_vs_sdpa"], ".2f")),
        ("eager/sdpa", lambda r: _num(r["eager_vs_sdpa"], ".2f")),
        ("fused MiB", lambda r: _mib(r["fused_mib"])), ("sdpa MiB", lambda r: _mib(r["sdpa_mib"])),
        ("eager MiB", lambda r: _mib(r["eager_mib"])),
    ]
    for header, _ in columns:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    Console().print(table)


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            print("error: `veridical bench kernels` times GPU kernels and needs a CUDA device "
                  "(none found); run it on a GPU machine, or pass --cpu-smoke to check the command "
                  "on tiny CPU shapes", file=sys.stderr)
            return 2
        from .triton_attention import TRITON_AVAILABLE

        if not TRITON_AVAILABLE:
            print("error: triton is not installed; install the 'gpu' extra "
                  "(pip install 'veridical[gpu]')", file=sys.stderr)
            return 2
    dtype = DTYPES[args.dtype]
    contexts = args.contexts or ([32, 48] if args.cpu_smoke else [1024, 2048, 4096])
    if args.cpu_smoke and dtype == torch.bfloat16:
        dtype = torch.float32
    rows = bench_kernels(args.modes, contexts, args.edits, args.batch_size, dtype,
                         rounds=1 if args.cpu_smoke else args.rounds,
                         iters=1 if args.cpu_smoke else args.iters, cpu_smoke=args.cpu_smoke)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        shape = "tiny CPU smoke shapes" if args.cpu_smoke else "LLaVA-1.5-7B attention shapes"
        _print_table(rows, f"fused edited attention vs SDPA (no edit) vs eager (edit), {shape}, "
                           f"{str(dtype).removeprefix('torch.')}, "
                           f"{rows[0]['device'] if rows else ''}")
    return 0


def add_bench(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``kernels`` to the ``veridical bench`` subcommands; returns its parser."""
    p = bench_subparsers.add_parser(
        "kernels", help="fused edited attention vs SDPA without edits vs eager with edits (GPU)")
    p.add_argument("--modes", type=_choices(("decode", "prefill")), default=["decode", "prefill"],
                   help="comma list of decode, prefill")
    p.add_argument("--contexts", type=_int_list, default=None,
                   help="comma list of key lengths (default 1024,2048,4096)")
    p.add_argument("--edits", type=_choices(EDITS), default=list(EDITS),
                   help=f"comma list of {', '.join(EDITS)}")
    p.add_argument("--batch-size", type=_int_list, default=[1, 8],
                   help="comma list of batch sizes (default 1,8)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the best is kept")
    p.add_argument("--iters", type=int, default=10, help="calls per timed round")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU to check the command (no GPU numbers)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_kernels)
    return p
