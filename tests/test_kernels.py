"""veridical.kernels: the fused Triton kernel equals the torch reference (the specification) on
shapes that hit every code path; the reference equals SDPA when nothing is edited and
``reweight_attention_`` on materialised weights for VAR; importing works without triton.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before
the kernel module is imported: the flag is read when the kernel is decorated), in fp32/fp16 and
on tiny grids (about 0.1 s per program). With CUDA the same tests run compiled, plus bf16 at
LLaVA-1.5-7B shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from veridical.kernels import (  # noqa: E402
    IMAGE,
    IMAGE_SINK,
    TEXT,
    TEXT_SINK,
    VAR,
    Export,
    PreSoftmax,
    attention,
    edited_attention,
    key_groups,
    reweight_attention_,
)
from veridical.kernels import triton_attention as ta  # noqa: E402
from veridical.kernels.reference import image_eps, visible_keys  # noqa: E402

if not CUDA and ta.TRITON_AVAILABLE and not ta.INTERPRET:  # imported earlier without the flag
    ta = importlib.reload(ta)

DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not ta.TRITON_AVAILABLE, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (CUDA and ta.TRITON_AVAILABLE), reason="needs CUDA + triton")
TOL = {  # output (atol, rtol), exported probabilities (atol, rtol)
    torch.float32: ((1e-4, 1e-4) if CUDA else (1e-5, 1e-5), (1e-6, 1e-3)),
    torch.float16: ((3e-3, 1e-2), (1e-6, 1e-3)),
    torch.bfloat16: ((2e-2, 2e-2), (1e-6, 1e-3)),
}
TK = 48  # keys: BOS text sink, text 1-15, image 16-39 (image sink at 35), text 40-47, sink at 44
IMAGE_KEYS = slice(16, 40)


def groups_for(B: int, tk: int = TK) -> torch.Tensor:
    """With 16-key blocks: block 0 text + sink (no image), block 1 only non-sink image (the
    kernel reuses its main product), block 2 image/image-sink/text/text-sink boundaries."""
    g = torch.full((B, tk), TEXT, dtype=torch.int8)
    g[:, IMAGE_KEYS] = IMAGE
    g[:, 0] = TEXT_SINK
    g[:, 35] = IMAGE_SINK
    g[:, 44] = TEXT_SINK
    return g.to(DEVICE)


def midgap(values: torch.Tensor) -> float:
    """A threshold in the largest gap of the middle half of ``values`` (at least 2): the rule
    then splits the rows and none sits near the threshold (kernel and reference round apart)."""
    s = values.flatten().double().sort().values
    lo, hi = len(s) // 4, max(len(s) // 4 + 1, 3 * len(s) // 4)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


def make_case(*, B=2, H=2, Hkv=2, tq=1, tk=TK, D=16, dtype=torch.float32, pad=False, pre=None,
              var=False, scale_text=False, export=False, causal=True, seed=0) -> tuple:
    """Inputs and edit arguments; VAR's thresholds split the rows (checked by the caller)."""
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, H, tq, D, generator=g)).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, tk, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, tk, D, generator=g).to(DEVICE, dtype)
    kw: dict = {"causal": causal}
    if pad:
        padding = torch.zeros(B, tk, dtype=torch.bool)
        padding[-1, :5] = True  # left padding of the last batch row
        kw["key_padding"] = padding.to(DEVICE)
    rows = torch.rand(B, tq, generator=g) < 0.6
    rows[:, -1] = True
    rows = rows.to(DEVICE)
    if pre == "pai":
        keys = torch.zeros(B, tk, dtype=torch.bool)
        keys[:, IMAGE_KEYS] = True
        kw["pre_softmax"] = PreSoftmax(torch.linspace(0.0, 0.6, H), keys.to(DEVICE), rows)
    elif pre == "fia":  # float multipliers per key: alpha on "top" tokens, beta on "bottom" ones
        keys = torch.zeros(B, tk)
        keys[:, 16:28], keys[:, 28:40] = 0.7, 0.3
        kw["pre_softmax"] = PreSoftmax(1.0, keys.to(DEVICE), None)
    if var:
        groups = groups_for(B, tk)
        heads = torch.ones(H, dtype=torch.bool)
        heads[-1] = H == 1
        var_rows = (torch.rand(B, tq, generator=g) < 0.7).to(DEVICE)
        var_rows[:, -1] = True
        # thresholds from the unedited-by-VAR weights, so the rule edits some rows, not all
        full = Export(torch.ones(B, tq, dtype=torch.bool, device=DEVICE), 0, tk)
        _, w = edited_attention(q, k, v, export=full, **kw)  # (B, H, tq, tk)
        image = w[..., (groups == IMAGE)[0]].sum(-1) + w[..., (groups == IMAGE_SINK)[0]].sum(-1)
        eps = image_eps(groups)[:, None, None]  # the rule's epsilon, per image key
        share = w[..., (groups == IMAGE_SINK)[0]].sum(-1) / (image + eps)
        heads = heads.to(DEVICE)
        sel = (image > 0) & var_rows[:, None, :] & heads[None, :, None]
        rho = midgap(share[sel])
        ok = sel & (share <= rho)
        summ = midgap(image[ok]) if ok.sum() >= 2 else 0.5 * float(image[ok].min())
        kw["var"] = VAR(groups, rows=var_rows, heads=heads, p=0.6, rho=rho, summ=summ,
                        scale_text=scale_text)
    if export:
        ex_rows = torch.zeros(B, tq, dtype=torch.bool)
        ex_rows[:, -1] = True
        if tq > 4:
            ex_rows[0, 2] = ex_rows[1, tq // 2] = True
        kw["export"] = Export(ex_rows.to(DEVICE), 3, tk - 2)  # starts and ends inside blocks
    return q, k, v, kw


def var_edits_some_rows(q, k, v, kw) -> None:
    """The VAR case is meaningful: its rule changes some selected rows and leaves others."""
    out, _ = edited_attention(q, k, v, **kw)
    var = kw["var"]
    off = VAR(var.groups, rows=torch.zeros_like(var.rows), heads=var.heads)
    base, _ = edited_attention(q, k, v, **{**kw, "var": off})
    changed = (out - base).abs().amax(-1) > 1e-6  # (B, tq, H)
    selected = var.rows[:, :, None] & var.heads[None, None, :]
    assert changed[selected].any() and not changed[selected].all()
    assert not changed[~selected].any()


def assert_close(got, want, dtype) -> None:
    (atol, rtol), (patol, prtol) = TOL[dtype]
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=atol, rtol=rtol)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:  # q.k is exact in fp32 on both sides: probabilities agree closely
        torch.testing.assert_close(got[1], want[1], atol=patol, rtol=prtol)


# (id, make_case kwargs, launcher block sizes): decode and prefill, each edit alone and combined
KERNEL_CASES = [
    ("decode-plain", {}, {}),
    ("decode-pad-gqa", {"H": 4, "Hkv": 2, "pad": True}, {}),
    ("decode-pai", {"pre": "pai"}, {"block_n": 16}),
    ("decode-fia-float-keys", {"pre": "fia", "pad": True}, {"block_n": 16}),
    ("decode-var", {"H": 4, "var": True}, {"block_n": 16}),
    ("decode-var-scale-text", {"H": 4, "var": True, "scale_text": True}, {"block_n": 16}),
    ("decode-export", {"export": True}, {"block_n": 16}),
    ("decode-all", {"H": 4, "Hkv": 2, "pad": True, "pre": "pai", "var": True, "export": True},
     {"block_n": 16}),
    ("decode-all-one-block", {"H": 4, "pad": True, "pre": "pai", "var": True, "export": True},
     {}),
    ("prefill-all", {"H": 2, "Hkv": 1, "tq": TK, "pad": True, "pre": "pai", "var": True,
                     "export": True}, {"block_m": 16, "block_n": 16}),
    ("chunk-all", {"B": 2, "H": 1, "Hkv": 1, "tq": 20, "pad": True, "pre": "pai", "var": True,
                   "export": True}, {"block_m": 16, "block_n": 32}),
    ("prefill-noncausal-var", {"H": 1, "Hkv": 1, "tq": 20, "var": True, "causal": False},
     {"block_m": 32, "block_n": 32}),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,case,blocks", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_reference(name, case, blocks, dtype):
    q, k, v, kw = make_case(dtype=dtype, **case)
    if "var" in kw:
        var_edits_some_rows(q, k, v, kw)
    got = ta.edited_attention_triton(q, k, v, **kw, **blocks)
    assert_close(got, edited_attention(q, k, v, **kw), dtype)
    if "key_padding" in kw and case.get("tq") == TK:  # rows that see only padding: zeros
        assert got[0][-1, :5].abs().max() == 0


@needs_triton
def test_dispatch_routes_agree():
    q, k, v, kw = make_case(pad=True, pre="pai", var=True, export=True)
    torch_route = attention(q, k, v, impl="torch", **kw)
    assert_close(attention(q, k, v, impl="triton", **kw), torch_route, torch.float32)
    assert_close(attention(q, k, v, impl="auto", **kw), torch_route, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="flash")


@needs_triton
def test_launcher_rejects_bad_arguments():
    q, k, v, kw = make_case()
    with pytest.raises(ValueError, match="block_n"):
        ta.edited_attention_triton(q, k, v, block_n=24)
    with pytest.raises(ValueError, match="k and v"):
        ta.edited_attention_triton(q, k, v[..., :8])
    if not CUDA:
        with pytest.raises(ValueError, match="bfloat16"):
            ta.edited_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with pytest.raises(ValueError, match="dtype"):
        ta.edited_attention_triton(q.double(), k.double(), v.double())


# --- the reference against independent formulations (no triton needed) ----------------------

@pytest.mark.parametrize("tq,Hkv,pad,causal", [(1, 2, False, True), (1, 1, True, True),
                                               (TK, 2, True, True), (20, 1, True, True),
                                               (20, 2, False, False)])
def test_reference_equals_sdpa_without_edits(tq, Hkv, pad, causal):
    q, k, v, kw = make_case(H=4, Hkv=Hkv, tq=tq, pad=pad, causal=causal)
    out, probs = edited_attention(q, k, v, **kw)
    assert probs is None and out.shape == (2, tq, 4, 16)
    visible = visible_keys(2, tq, TK, kw.get("key_padding"), causal, q.device)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                            enable_gqa=Hkv != 4)
    sdpa = torch.where(visible.any(-1, keepdim=True), sdpa, 0.0).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=1e-6, rtol=0)
    routed, none = attention(q, k, v, impl="torch", **kw)  # the SDPA route of the dispatcher
    assert none is None
    torch.testing.assert_close(routed, out, atol=1e-6, rtol=0)


def softmax_weights(q, k, v, kw) -> torch.Tensor:
    """Materialised post-softmax weights (B, H, Tq, Tk), pre-softmax edit included."""
    rep = q.shape[1] // k.shape[1]
    a = q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    pre = kw.get("pre_softmax")
    if pre is not None:
        rows = pre.rows if pre.rows is not None else torch.ones(a.shape[0], a.shape[2],
                                                                dtype=torch.bool)
        alpha = torch.as_tensor(pre.alpha, dtype=torch.float32).expand(a.shape[1])
        coef = alpha[None, :, None, None] * pre.keys.float()[:, None, None, :]
        a = torch.where(rows[:, None, :, None], a + coef * a.abs(), a)
    visible = visible_keys(q.shape[0], q.shape[2], k.shape[2], kw.get("key_padding"),
                           kw["causal"], q.device)
    return torch.softmax(a.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)


@pytest.mark.parametrize("scale_text", [False, True])
@pytest.mark.parametrize("tq", [1, 20])
def test_reference_var_equals_reweight_on_materialised_weights(tq, scale_text):
    q, k, v, kw = make_case(H=2, Hkv=1, tq=tq, pad=True, pre="pai", var=True,
                            scale_text=scale_text, seed=1)
    var_edits_some_rows(q, k, v, kw)
    all_rows = Export(torch.ones(2, tq, dtype=torch.bool), 0, TK)
    out, probs = edited_attention(q, k, v, **{**kw, "export": all_rows})
    w = softmax_weights(q, k, v, kw)
    var = kw["var"]
    same = reweight_attention_(w, var.groups, p=var.p, rho=var.rho, summ=var.summ,
                               heads=var.heads, rows=var.rows, scale_text=scale_text)
    assert same is w
    torch.testing.assert_close(probs, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (w @ v.repeat_interleave(2, 1)).transpose(1, 2),
                               atol=1e-5, rtol=0)
    seen = w.sum(-1) > 0
    torch.testing.assert_close(w.sum(-1)[seen], torch.ones_like(w.sum(-1)[seen]))  # mass kept


def test_reweight_attention_exact_values():
    # keys: text, text sink, image, image sink, image
    groups = torch.tensor([[TEXT, TEXT_SINK, IMAGE, IMAGE_SINK, IMAGE]], dtype=torch.int8)
    w = torch.tensor([[[[0.1, 0.2, 0.3, 0.1, 0.3],  # image 0.7, sink share 1/7: edited
                        [0.1, 0.2, 0.1, 0.5, 0.1],  # sink share 5/7 > rho: kept
                        [0.5, 0.4, 0.05, 0.0, 0.05]]]], dtype=torch.float64)  # image 0.1 < summ
    reweight_attention_(w, groups, p=0.5, rho=0.5, summ=0.2)
    # sinks halved (0.2 -> 0.1, 0.1 -> 0.05); the removed 0.15 split 1:1 between the image keys
    want = torch.tensor([[0.1, 0.1, 0.375, 0.05, 0.375], [0.1, 0.2, 0.1, 0.5, 0.1],
                         [0.5, 0.4, 0.05, 0.0, 0.05]], dtype=torch.float64)
    torch.testing.assert_close(w[0, 0], want, atol=1e-15, rtol=0)
    w2 = torch.tensor([[[[0.1, 0.2, 0.3, 0.1, 0.3]]]], dtype=torch.float64)
    reweight_attention_(w2, groups, p=0.5, rho=0.5, summ=0.2, scale_text=True)
    torch.testing.assert_close(w2[0, 0, 0], torch.tensor([0.05, 0.1, 0.4, 0.05, 0.4],
                                                         dtype=torch.float64), atol=1e-15, rtol=0)
    w3 = torch.tensor([[[[0.1, 0.2, 0.3, 0.1, 0.3]]]])
    reweight_attention_(w3, groups, p=0.5, heads=torch.tensor([False]))
    assert w3[0, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.1, 0.3])


# VAR's epsilon on a hand-built row (weights exact in binary): text, text sink, two image sinks,
# six image keys. The sink share is 0.0625 / (0.125 + 8e-6) = 0.499968 with 1e-6 per image key
# (the reference's sum(image_attn + 1e-6)): <= rho 0.49997 (any epsilon >= 7.5e-6 gives that),
# > rho 0.499966 (any epsilon < 8.5e-6), while 1e-6 once (0.499996) or none (0.5) exceeds both.
EPS_GROUPS = [TEXT, TEXT_SINK, IMAGE_SINK, IMAGE_SINK] + [IMAGE] * 6
EPS_ROW = [0.5, 0.375, 0.03125, 0.03125, 0.015625, 0.015625] + [0.0078125] * 4
# p = 0.5: sinks halved, the removed 0.21875 to the image keys in proportion (x 4.5)
EPS_EDITED = [0.5, 0.1875, 0.015625, 0.015625, 0.0703125, 0.0703125] + [0.03515625] * 4
EPS_CASES = [(0.49997, EPS_EDITED), (0.499966, EPS_ROW)]  # (rho, the weights after VAR)


def test_var_epsilon_is_added_per_image_key_on_weights():
    groups = torch.tensor([EPS_GROUPS], dtype=torch.int8)
    assert image_eps(groups, torch.float64).tolist() == [8e-6]
    for rho, want in EPS_CASES:
        w = torch.tensor(EPS_ROW, dtype=torch.float64).reshape(1, 1, 1, 10)
        reweight_attention_(w, groups, p=0.5, rho=rho, summ=0.1)
        assert w.flatten().tolist() == want


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_var_epsilon_is_added_per_image_key_in_attention(impl):
    """The hand-built row as attention: logits log(w) on one-hot keys (scaling 1), one-hot
    values, so the output row is the weights after VAR."""
    run = {"reference": edited_attention, "triton": ta.edited_attention_triton}[impl]
    q = torch.tensor(EPS_ROW).log().reshape(1, 1, 1, 10).to(DEVICE)
    k = v = torch.eye(10).reshape(1, 1, 10, 10).to(DEVICE)
    groups = torch.tensor([EPS_GROUPS], dtype=torch.int8, device=DEVICE)
    atol, rtol = TOL[torch.float32][0]  # far below the 0.1875 an edit moves
    for rho, want in EPS_CASES:
        out, _ = run(q, k, v, scaling=1.0, var=VAR(groups, p=0.5, rho=rho, summ=0.1))
        torch.testing.assert_close(out.flatten().cpu(), torch.tensor(want), atol=atol, rtol=rtol)


def test_key_groups_from_image_and_sink_masks():
    image = torch.tensor([[False, False, True, True]])
    sink = torch.tensor([[False, True, False, True]])
    assert key_groups(image, sink).tolist() == [[TEXT, TEXT_SINK, IMAGE, IMAGE_SINK]]
    assert key_groups(image, sink).dtype == torch.int8
    with pytest.raises(ValueError, match="bool masks"):
        key_groups(image.long(), sink)


def test_reference_pre_softmax_and_export_match_materialised_weights():
    q, k, v, kw = make_case(H=2, tq=20, pad=True, pre="pai")
    w = softmax_weights(q, k, v, kw)
    rows = torch.zeros(2, 20, dtype=torch.bool)
    rows[:, [4, 19]] = True
    out, probs = edited_attention(q, k, v, **kw, export=Export(rows, 10, 30))
    torch.testing.assert_close(probs, w[:, :, [4, 19], 10:30], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (w @ v).transpose(1, 2), atol=1e-5, rtol=0)
    # alpha = 0 on every head is no edit at all
    zero = PreSoftmax(0.0, kw["pre_softmax"].keys, None)
    plain, _ = edited_attention(q, k, v, key_padding=kw["key_padding"])
    torch.testing.assert_close(edited_attention(q, k, v, key_padding=kw["key_padding"],
                                                pre_softmax=zero)[0], plain, atol=0, rtol=0)


@pytest.mark.parametrize("bad,match", [
    ({"key_padding": torch.zeros(2, 5, dtype=torch.bool)}, "key_padding"),
    ({"key_padding": torch.zeros(2, TK)}, "key_padding"),
    ({"pre_softmax": PreSoftmax(torch.ones(3), torch.ones(2, TK, dtype=torch.bool))}, "alpha"),
    ({"pre_softmax": PreSoftmax(0.2, torch.ones(2, 7, dtype=torch.bool))}, "pre_softmax.keys"),
    ({"var": VAR(torch.zeros(2, TK, dtype=torch.int64))}, "var.groups"),
    ({"var": VAR(torch.full((2, TK), 7, dtype=torch.int8))}, "var.groups"),
    ({"var": VAR(torch.zeros(2, TK, dtype=torch.int8), p=1.5)}, "var.p"),
    ({"var": VAR(torch.zeros(2, TK, dtype=torch.int8), heads=torch.ones(3, dtype=torch.bool))},
     "var.heads"),
    ({"export": Export(torch.ones(2, 1, dtype=torch.bool), 5, 5)}, "window"),
    ({"export": Export(torch.tensor([[True], [False]]), 0, 5)}, "same number"),
    ({"scaling": -1.0}, "scaling"),
])
def test_reference_rejects_bad_arguments(bad, match):
    q, k, v, _ = make_case()
    with pytest.raises(ValueError, match=match):
        edited_attention(q.cpu(), k.cpu(), v.cpu(), **bad)


def test_reference_rejects_bad_shapes():
    q, k, v, _ = make_case()
    with pytest.raises(ValueError, match="divide"):
        edited_attention(q.cpu(), k.cpu()[:, :1].expand(2, 3, TK, 16).contiguous(),
                         v.cpu()[:, :1].expand(2, 3, TK, 16).contiguous())
    with pytest.raises(ValueError, match="more positions"):
        edited_attention(k.cpu(), q.cpu(), q.cpu())
    with pytest.raises(ValueError, match="one dtype"):
        edited_attention(q.cpu(), k.cpu().half(), v.cpu())


# --- packaging and the bench command --------------------------------------------------------

def test_import_and_torch_route_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import torch
import veridical.kernels as K
from veridical.kernels import triton_attention, bench
assert not triton_attention.TRITON_AVAILABLE
q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
keys = torch.ones(1, 6, dtype=torch.bool)
out, _ = K.attention(q, k, v, pre_softmax=K.PreSoftmax(0.2, keys))
assert out.shape == (1, 1, 2, 8)
try:
    K.attention(q, k, v, impl="triton")
except RuntimeError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("impl='triton' without triton must fail clearly")
print("ok")
"""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def run_bench(argv: list[str]) -> tuple[int, str, str]:
    from veridical.kernels.bench import add_bench

    parser = argparse.ArgumentParser(prog="veridical")
    add_bench(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


def test_bench_kernels_cpu_smoke():
    rc, out, _ = run_bench(["kernels", "--cpu-smoke", "--contexts", "24", "--batch-size", "1",
                            "--edits", "pai+var,opera", "--json"])
    assert rc == 0
    rows = json.loads(out)
    assert [(r["mode"], r["edit"]) for r in rows] == [
        ("decode", "pai+var"), ("decode", "opera"), ("prefill", "pai+var"), ("prefill", "opera")]
    assert all(r["fused_ms"] > 0 and r["fused_vs_sdpa"] > 0 for r in rows)


@pytest.mark.skipif(CUDA, reason="checks the message shown without CUDA")
def test_bench_kernels_without_cuda_says_so():
    rc, _, err = run_bench(["kernels"])
    assert rc == 2 and "needs a CUDA device" in err and "--cpu-smoke" in err


AOT_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from veridical.kernels.triton_attention import _edited_attention_kernel as K

types = {"Probs": "*fp32", "PreKeys": "*fp32", "Alpha": "*fp32", "Groups": "*i8",
         "VarEps": "*fp32", "ExportIdx": "*i32", "qk_scale": "fp32", "var_p": "fp32",
         "var_rho": "fp32", "var_summ": "fp32",
         **dict.fromkeys(["Pad", "PreRows", "VarRows", "VarHeads"], "*u8")}
for dt, block_m, block_n, warps in (("bf16", 16, 128, 4), ("fp16", 64, 64, 8),
                                    ("fp32", 64, 64, 4)):
    const = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True,
                 HAS_PAD=True, HAS_PRE=True, HAS_VAR=True, SCALE_TEXT=False, EXPORT=True,
                 DOT_PRECISION="tf32x3" if dt == "fp32" else "tf32")
    sig = {n: types.get(n, "i32") for n in K.arg_names}
    sig.update({n: "*" + dt for n in ("Q", "K", "V", "Out")}, **dict.fromkeys(const, "constexpr"))
    triton.compile(ASTSource(K, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": 2})
print("ok")
"""


@pytest.mark.slow
@needs_triton
def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter skips compilation; compile to an sm_90 cubin (triton bundles ptxas) so
    that errors only the compiler sees show up on machines without a GPU."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


# --- GPU only: bf16 and LLaVA-1.5-7B shapes ---------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("name,case,blocks", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_reference_bf16(name, case, blocks):
    q, k, v, kw = make_case(dtype=torch.bfloat16, **case)
    got = ta.edited_attention_triton(q, k, v, **kw, **blocks)
    assert_close(got, edited_attention(q, k, v, **kw), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("context", [1024, 4096])
def test_kernel_llava7b_shapes(context, mode, dtype):
    from veridical.kernels.bench import LLAVA_7B
    from veridical.kernels.bench import make_case as bench_case

    print(f"card: {torch.cuda.get_device_name()}")
    case = bench_case(LLAVA_7B, 1, mode, context, "pai+var", dtype, "cuda")
    last = torch.zeros_like(case["pre_softmax"].rows)
    last[:, -1] = True
    kw = {"pre_softmax": case["pre_softmax"], "var": case["var"],
          "export": Export(last, max(0, context - 512), context)}
    got = attention(case["q"], case["k"], case["v"], impl="triton", **kw)
    want = edited_attention(case["q"], case["k"], case["v"], **kw)
    assert_close(got, want, dtype)
