"""Attention edits through the SDPA path equal an eager reference that materialises the
weights and applies the paper's rule; strength 0 is the baseline; batches are invariant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import eager_mask

from tests.conftest import tiny_engine
from veridical.decoding.attention import EditPlan, plan_active, restore, use_edits
from veridical.decoding.inputs import encode
from veridical.decoding.method import RowInfo
from veridical.decoding.methods.pai import PAIEdit, mapped_start
from veridical.decoding.state import BatchState

REFERENCE = {"image_keys": None, "alpha": 0.0, "layers": set(), "head_scale": {},
             "key_factor": None}


def eager_pai_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        **kwargs):
    """PAI's reference rule on fully materialised eager attention (LALBJ/PAI attention.py):
    logits + mask, clamp at the dtype minimum, a + alpha|a| on image columns of the last query
    row, softmax in fp32."""
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, H, q, kv)
    if attention_mask is not None:
        w = torch.maximum(w + attention_mask, torch.tensor(torch.finfo(w.dtype).min))
    if module.layer_idx in REFERENCE["layers"]:
        cols = REFERENCE["image_keys"][:, None, :]  # (B, 1, kv)
        last = w[:, :, -1, :]
        if REFERENCE["key_factor"] is not None:  # FIA: a + factor[b, h, key] |a|
            factor = REFERENCE["key_factor"][module.layer_idx]
            factor = torch.nn.functional.pad(factor, (0, last.shape[-1] - factor.shape[-1]))
            w[:, :, -1, :] = last + factor * last.abs()
        else:
            w[:, :, -1, :] = torch.where(cols, last + REFERENCE["alpha"] * last.abs(), last)
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(p, v).transpose(1, 2).contiguous()  # (B, q, H, D)
    scale = REFERENCE["head_scale"].get(module.layer_idx)
    if scale is not None:  # VHR: selected heads' outputs at the generating position, x alpha
        out[:, -1] = out[:, -1] * scale[:, :, None]
    return out, p


AttentionInterface.register("test_eager_pai", eager_pai_attention)
AttentionMaskInterface.register("test_eager_pai", eager_mask)


def run_two_steps(engine, batch, plan_edits, image_id, ref=REFERENCE):
    """Prefill + one decode step through BatchState; returns both steps' logits (the reference's
    image keys grow by the decoded token)."""
    info = RowInfo(["main"], n_slots=batch["input_ids"].shape[0])
    rows = BatchState(engine.model, dict(batch), engine.cache_kw, info, image_id, plan_edits)
    first = rows.prefill()
    if ref["image_keys"] is not None:
        ref["image_keys"] = torch.cat(
            [ref["image_keys"], torch.zeros(first.shape[0], 1, dtype=torch.bool)], dim=-1)
    second = rows.step(first.argmax(-1))
    return first, second


def fake_context(n_layers: int) -> SimpleNamespace:
    """A method context stand-in: ``n_layers`` pass-through decoder layers, a 4096-wide text
    model with 32 heads (LLaVA-1.5-7B's), for the methods' layer choices and VAR's sink hooks."""

    class Layer(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    layers = [Layer() for _ in range(n_layers)]
    config = SimpleNamespace(hidden_size=4096, num_attention_heads=32)
    return SimpleNamespace(model=SimpleNamespace(config=None), adapter=SimpleNamespace(
        decoder_layers=lambda model: layers, text_config=lambda model_config: config))


# The edited layers per depth, by hand from the papers' rules (not from the helpers): PAI, FIA
# and VAR edit from layer 2 of 32 (round(2 L / 32)) through the last; VHR edits layer 1 of 32
# (round(L / 32)) and the last 14 of 32 (round(14 L / 32), at least 1). Depths: LLaVA-1.5 7B
# (32), 13B (40), Qwen2-VL-7B (28), the built-in model (4) and the tiny test models (2).
EDITED_LAYERS = {
    32: (set(range(2, 32)), {1, *range(18, 32)}),
    40: (set(range(2, 40)), {1, *range(22, 40)}),  # 2.5 -> 2 (half to even); 17.5 -> 18
    28: (set(range(2, 28)), {1, *range(16, 28)}),  # 1.75 -> 2; 0.875 -> 1; 12.25 -> 12
    4: ({0, 1, 2, 3}, {0, 2, 3}),  # 0.25 -> 0; 0.125 -> 0; 1.75 -> 2
    2: ({0, 1}, {0, 1}),  # 0.125 -> 0; 0.0625 -> 0; 0.875 -> 1
}


@pytest.mark.parametrize("n_layers", sorted(EDITED_LAYERS))
def test_edited_layers_per_depth(n_layers):
    from veridical.decoding.methods.fia import FIA
    from veridical.decoding.methods.pai import PAI
    from veridical.decoding.methods.var import VAR
    from veridical.decoding.methods.vhr import VHR

    ctx = fake_context(n_layers)
    from_two, vhr = EDITED_LAYERS[n_layers]
    (pai,) = PAI().attention_edits(ctx)
    (fia,) = FIA(head_modulation=False).attention_edits(ctx)
    (vhr_edit,) = VHR().attention_edits(ctx)
    (var,) = VAR(sink_dims="3").attention_edits(ctx)
    (var_last,) = VAR(sink_dims="3", last_layer=False).attention_edits(ctx)
    assert pai.layers() == from_two and fia.layers() == from_two
    assert vhr_edit.layers() == vhr
    assert var.layers() == from_two  # the last layer too, as the reference code
    assert var_last.layers() == from_two - {n_layers - 1}


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_pai_edit_equals_eager_reference_with_left_padding(arch, images, prompts):
    engine = tiny_engine(arch)
    batch = engine.collate([encode(engine.processor, i, p) for i, p in zip(images, prompts)])
    assert (batch["attention_mask"] == 0).any()  # left padding is exercised
    image_id = engine.adapter.image_token_id(engine.model.config)
    n_layers = len(engine.adapter.decoder_layers(engine.model))
    edit = PAIEdit(range(mapped_start(n_layers), n_layers), alpha=0.7)

    REFERENCE.update(image_keys=batch["input_ids"] == image_id, alpha=0.7, layers=edit.layers())
    engine.model.set_attn_implementation({"text_config": "test_eager_pai"})
    try:
        ref = run_two_steps(engine, batch, [], image_id)
    finally:
        engine.model.set_attn_implementation({"text_config": "sdpa"})
    previous = use_edits(engine.model, True)
    try:
        ours = run_two_steps(engine, batch, [edit], image_id)
    finally:
        restore(engine.model, previous)
    plain = run_two_steps(engine, batch, [], image_id)
    for a, b, c in zip(ours, ref, plain):
        assert (a - b).abs().max() <= 1e-5
        assert (a - c).abs().max() > 1e-3  # the edit does change the output


def test_no_plan_means_plain_sdpa(images, prompts):
    engine = tiny_engine("llava")
    inputs = encode(engine.processor, images[0], prompts[0])
    with torch.inference_mode():
        plain = engine.model(**inputs).logits
        previous = use_edits(engine.model, True)
        try:
            with plan_active(None):
                routed = engine.model(**inputs).logits
            rows = torch.ones(1, dtype=torch.bool)
            with plan_active(EditPlan([], rows, inputs["input_ids"] == 0)):
                empty = engine.model(**inputs).logits
        finally:
            restore(engine.model, previous)
    assert torch.equal(plain, routed) and torch.equal(plain, empty)
    assert engine.model.config.get_text_config()._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl", "qwen3-vl-moe"])
def test_pai_strength_zero_and_batch_invariance(arch, images, prompts):
    engine = tiny_engine(arch)
    base = engine.generate(images, prompts, max_new_tokens=6)
    off = engine.generate(images, prompts, method="pai", method_args={"alpha": 0.0, "gamma": 1.0},
                          max_new_tokens=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, do_sample=True, seed=[1, 2, 3, 4]),
               dict(max_new_tokens=5, num_beams=2)):
        batch = engine.generate(images, prompts, method="pai", **kw)
        seeds = kw.get("seed", [None] * 4)
        alone = [engine.generate(i, p, method="pai", **{**kw, "seed": s}).token_ids
                 for i, p, s in zip(images, prompts, seeds)]
        assert [r.token_ids for r in batch] == alone


def test_pai_composes_with_vcd_and_edits_only_the_real_rows(images, prompts):
    engine = tiny_engine("llava")
    kw = dict(max_new_tokens=6)
    both = engine.generate(images, prompts, method="pai+vcd", **kw)
    alone = [engine.generate(i, p, method="pai+vcd", seed=r.seed, **kw).token_ids
             for i, p, r in zip(images, prompts, both)]
    assert [r.token_ids for r in both] == alone
    assert engine.model.config.get_text_config()._attn_implementation == "sdpa"


def test_vhr_selection_and_scaling_equal_a_direct_computation(images, prompts):
    """VHD from separate image / text-only forwards captured in the test, the paper's
    selection rule written out here, and the scaling applied by the eager reference."""
    from veridical.decoding.method import Request
    from veridical.decoding.methods.vhr import VHR, VHREdit, vhr_layers

    engine = tiny_engine("llava")
    decoder = engine.adapter.decoder_layers(engine.model)
    n_layers, heads = len(decoder), engine.model.config.text_config.num_attention_heads
    layers = vhr_layers(n_layers)
    requests = [Request(i, p) for i, p in zip(images, prompts)]
    data = VHR(alpha=2.0).prepare(engine.context(), requests)["vhr_scale"]  # (n, layers, H)

    expected = []
    for image, prompt in zip(images, prompts):  # one request at a time, no batching
        outs = {}
        for key, img in (("image", image), ("text", None)):
            got: dict[int, torch.Tensor] = {}
            hooks = [decoder[layer].self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, layer=layer, got=got: got.__setitem__(
                    layer, a[0][0, -1].view(heads, -1)))
                for layer in layers]
            with torch.inference_mode():
                engine.model(**encode(engine.processor, img, prompt))
            for h in hooks:
                h.remove()
            outs[key] = got
        per_layer = []
        for layer in layers:
            vhd = (outs["image"][layer] - outs["text"][layer]).norm(dim=-1)
            tn = outs["text"][layer].norm(dim=-1)
            out = (vhd > vhd.mean() + vhd.std()) & (tn > tn.mean() + tn.std())
            vhd = torch.where(out, 0.0, vhd)
            per_layer.append(torch.where(vhd > vhd.median(), 2.0, 1.0))
        expected.append(torch.stack(per_layer))
    assert torch.equal(data, torch.stack(expected))
    assert ((data == 2.0).sum(-1) > 0).all()  # some heads selected in every layer

    batch = engine.collate([encode(engine.processor, i, p) for i, p in zip(images, prompts)])
    image_id = engine.adapter.image_token_id(engine.model.config)
    REFERENCE.update(image_keys=batch["input_ids"] == image_id, layers=set(),
                     head_scale={layer: data[:, i] for i, layer in enumerate(layers)})
    engine.model.set_attn_implementation({"text_config": "test_eager_pai"})
    try:
        ref = run_two_steps(engine, batch, [], image_id)
    finally:
        engine.model.set_attn_implementation({"text_config": "sdpa"})
        REFERENCE["head_scale"] = {}
    info = RowInfo(["main"], n_slots=4)
    previous = use_edits(engine.model, True)
    try:
        rows = BatchState(engine.model, dict(batch), engine.cache_kw, info, image_id,
                     [VHREdit(layers)], {"vhr_scale": data})
        first = rows.prefill()
        second = rows.step(first.argmax(-1))
    finally:
        restore(engine.model, previous)
    assert (first - ref[0]).abs().max() <= 1e-5 and (second - ref[1]).abs().max() <= 1e-5


def test_vhr_head_set_stays_fixed_during_decoding(images, prompts, monkeypatch):
    from veridical.decoding.methods import vhr

    seen, prepared = [], []
    real_scale, real_prepare = vhr.VHREdit.head_scale, vhr.VHR.prepare
    monkeypatch.setattr(vhr.VHREdit, "head_scale",
                        lambda self, layer, plan: seen.append(real_scale(self, layer, plan).clone())
                        or seen[-1])
    monkeypatch.setattr(vhr.VHR, "prepare",
                        lambda self, e, r: prepared.append(1) or real_prepare(self, e, r))
    engine = tiny_engine("llava")
    engine.generate(images[0], prompts[0], method="vhr", max_new_tokens=5)
    n_layers = len(vhr.vhr_layers(len(engine.adapter.decoder_layers(engine.model))))
    assert prepared == [1] and len(seen) == 5 * n_layers
    for step in range(1, 5):
        for i in range(n_layers):
            assert torch.equal(seen[step * n_layers + i], seen[i])


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_vhr_strength_zero_and_batch_invariance(arch, images, prompts):
    engine = tiny_engine(arch)
    base = engine.generate(images, prompts, max_new_tokens=6)
    off = engine.generate(images, prompts, method="vhr", method_args={"alpha": 1.0},
                          max_new_tokens=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, do_sample=True, seed=[1, 2, 3, 4]),
               dict(max_new_tokens=5, num_beams=2)):
        batch = engine.generate(images, prompts, method="vhr+vcd", **kw)
        alone = [engine.generate(i, p, method="vhr+vcd", **{**kw, "seed": r.seed}).token_ids
                 for i, p, r in zip(images, prompts, batch)]
        assert [r.token_ids for r in batch] == alone


VAR_REF = {"image_keys": None, "sinks": {}, "layers": set(), "p": 0.6, "rho": 0.5, "summ": 0.01}


def eager_var_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        **kwargs):
    """VAR's rule written out per (row, head, query) on materialised eager weights, as the
    reference code (seilk/VisAttnSink logic.py) states it, in VAR_REF["layers"]."""
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling + attention_mask
    p = torch.softmax(w, dim=-1, dtype=torch.float32)
    layer = module.layer_idx
    if layer in VAR_REF["layers"]:
        image = VAR_REF["image_keys"]
        sink = VAR_REF["sinks"][layer]
        B, H, Q, K = p.shape
        for b in range(B):
            img_pos = image[b].nonzero().flatten().tolist()
            if not (image[b] & sink[b]).any():  # no image sink in this layer: no head forked
                continue
            for qi in range(Q):
                kpos = K - Q + qi
                is_real = attention_mask[b, 0, qi, kpos] == 0
                if Q > 1 and not (img_pos and kpos > max(img_pos) and is_real):
                    continue
                for h in range(H):
                    row = p[b, h, qi]
                    total = row[image[b]].sum()
                    share = row[image[b] & sink[b]].sum() / (row[image[b]] + 1e-6).sum()
                    if not (share <= VAR_REF["rho"] and total >= VAR_REF["summ"]):
                        continue
                    moved = sink[b]  # text sinks and image sinks
                    target = image[b] & ~sink[b]
                    removed = (1 - VAR_REF["p"]) * row[moved].sum()
                    new = row.clone()
                    new[moved] = row[moved] * VAR_REF["p"]
                    new[target] = row[target] + removed * row[target] / row[target].sum()
                    p[b, h, qi] = new
    return torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous(), p


AttentionInterface.register("test_eager_var", eager_var_attention)
AttentionMaskInterface.register("test_eager_var", eager_mask)


# the tiny models have 2 layers: sinks and edits from layer round(2 * 2 / 32) = 0 on, through
# the last one by default, through layer 0 with last_layer=false
VAR_VARIANTS = {"default": ({}, {0, 1}),
                "options": ({"decode_sinks": True, "last_layer": False}, {0})}


@pytest.mark.parametrize("arch,impl,variant", [  # auto: the numba loops at decode on CPU
    ("llava", "auto", "default"), ("llava", "torch", "default"), ("qwen2-vl", "auto", "default"),
    ("qwen2-vl", "torch", "default"), ("llava", "auto", "options"), ("llava", "torch", "options")])
def test_var_equals_eager_reference_with_left_padding(arch, impl, variant, images, prompts):
    from veridical.decoding.methods.var import VAR, VAREdit
    from veridical.heads.scores import effective_tau, rms_abs

    engine = tiny_engine(arch)
    batch = engine.collate([encode(engine.processor, i, p) for i, p in zip(images, prompts)])
    image_id = engine.adapter.image_token_id(engine.model.config)
    decoder = engine.adapter.decoder_layers(engine.model)
    width = engine.adapter.text_config(engine.model.config).hidden_size
    dims, tau = [3, 7], 10.0  # threshold 1.25 at width 64: some tokens are sinks, not all
    threshold = effective_tau(tau, width)
    options, layers = VAR_VARIANTS[variant]
    assert len(decoder) == 2

    # reference: sink flags from the test's own hooks on the layer inputs; generated tokens are
    # never sinks unless decode_sinks (the reference flags at the prefill only)
    flags: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(decoder))}

    def capture(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            is_sink = (rms_abs(hidden)[..., dims] > threshold).any(-1)
            recorded = i in layers and (not flags[i] or options.get("decode_sinks", False))
            flags[i].append(is_sink if recorded else torch.zeros_like(is_sink))
            VAR_REF["sinks"][i] = torch.cat(flags[i], dim=1)
        return hook

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True)
             for i, layer in enumerate(decoder)]
    VAR_REF.update(image_keys=batch["input_ids"] == image_id, sinks={}, layers=layers)
    engine.model.set_attn_implementation({"text_config": "test_eager_var"})
    try:
        ref = run_two_steps(engine, batch, [], image_id, VAR_REF)
    finally:
        engine.model.set_attn_implementation({"text_config": "sdpa"})
        for h in hooks:
            h.remove()
    sinks = torch.cat([f.flatten() for f in VAR_REF["sinks"].values()])
    assert 0 < sinks.float().mean() < 0.7  # sinks take part, and not every token is one
    generated = VAR_REF["sinks"][0][:, -1]  # the decoded token's flags in layer 0
    assert generated.any() if options else not generated.any()

    method = VAR(sink_dims="3,7", tau=tau, summ=0.01, **options)
    info = RowInfo(["main"], n_slots=4)
    handles = method.install(engine.context(), info)
    previous = use_edits(engine.model, True)
    try:
        rows = BatchState(engine.model, dict(batch), engine.cache_kw, info, image_id,
                     method.attention_edits(engine.context()), impl=impl)
        first = rows.prefill()
        second = rows.step(first.argmax(-1))
    finally:
        restore(engine.model, previous)
        for h in handles:
            h.remove()
    plain = run_two_steps(engine, batch, [], image_id, {"image_keys": None})
    (edit,) = method.attention_edits(engine.context())
    assert isinstance(edit, VAREdit) and edit.layers() == layers
    assert len(handles) == len(layers)  # one sink hook per edited layer
    for a, b, c in zip((first, second), ref, plain):
        assert (a - b).abs().max() <= 1e-5
        assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["auto", "torch"])  # auto: the numba loop on float32 CPU
@pytest.mark.parametrize("options,sink_layers", [
    ({}, range(2, 32)),  # the reference: the prompt's tokens only, layers 2..31 of 32
    ({"decode_sinks": True}, range(2, 32)),
    ({"last_layer": False}, range(2, 31)),
])
def test_var_sink_flags_of_prompt_and_generated_tokens(options, sink_layers, impl):
    """A 32-layer stand-in (width 4096: the threshold is tau = 20): the prompt's image token 1
    and the generated token carry a massive activation on the watched dim 3, the other tokens
    none. The prompt's token is a sink in every sink layer; the generated one only with
    decode_sinks."""
    from veridical.decoding.methods.var import VAR

    ctx = fake_context(32)
    decoder = ctx.adapter.decoder_layers(ctx.model)
    massive = torch.ones(4096)
    massive[3] = 1000.0  # |h / rms(h)| = 1000 / sqrt((4095 + 1e6) / 4096) = 63.9 > 20
    handles = VAR(sink_dims="3", **options).install(ctx, None)
    try:
        prompt = torch.ones(1, 3, 4096)
        prompt[0, 1] = massive
        plan = EditPlan([], torch.tensor([True]), torch.tensor([[False, True, True]]), impl=impl)
        with plan_active(plan):
            for layer in decoder:
                layer(prompt)
        past = plan.fresh["var_sink"]  # (1, 3, 32)
        plan = EditPlan([], torch.tensor([True]), torch.tensor([[False, True, True, False]]),
                        key_state={"var_sink": past}, impl=impl)
        with plan_active(plan):
            for layer in decoder:
                layer(massive[None, None])
        generated = plan.fresh["var_sink"]  # (1, 1, 32)
    finally:
        for handle in handles:
            handle.remove()
    sinks = [layer in sink_layers for layer in range(32)]
    assert past[0, 1].tolist() == sinks
    assert not past[0, [0, 2]].any()
    assert generated[0, 0].tolist() == (sinks if options.get("decode_sinks") else [False] * 32)


def test_var_skips_sink_flags_only_where_no_image_sink_can_act():
    from veridical.decoding.methods.var import may_have_image_sinks

    def plan(image_keys, past, n_layers=3):
        return SimpleNamespace(fresh={"var_sink": torch.zeros(2, 1, n_layers, dtype=torch.bool)},
                               key_state={} if past is None else {"var_sink": past},
                               image_keys=image_keys, remember=lambda k, make: make())

    image = torch.tensor([[False, True, True, False, False], [True, True, False, False, False]])
    past = torch.zeros(2, 4, 3, dtype=torch.bool)
    past[0, 2, 1] = True  # row 0: image token 2 is a sink in layer 1
    past[1, 3, 2] = True  # row 1: text token 3 is a sink in layer 2 (not an image sink)
    assert may_have_image_sinks(plan(image, past)) == [False, True, False]
    assert may_have_image_sinks(plan(image, None)) == [True] * 3  # the prompt's forward
    assert may_have_image_sinks(plan(image[:, :1] & False, None)) == [False] * 3  # text only


def test_var_skipping_sink_flags_changes_nothing(monkeypatch):
    # The built-in model (4 layers, all edited) with generated tokens as sink candidates
    # (decode_sinks) and a sink rule under which, at decode, the cache holds image sinks in some
    # edited layers but not in others: those layers' flags are skipped (on the torch route; the
    # compiled loops flag every decode token, test_kernels_cpu.py).
    import veridical
    import veridical.decoding.methods.var as var
    from veridical.bench import PROMPTS, bench_images

    engine = veridical.load("builtin:synthcoco-llava")
    engine.attention_impl = "torch"
    images, prompts = bench_images(2), PROMPTS[:2]
    args = {"sink_dims": "45", "tau": 20.0, "decode_sinks": True}
    kw = dict(method="var", max_new_tokens=8, logprobs=3)
    seen, real = [], var.may_have_image_sinks
    monkeypatch.setattr(var, "may_have_image_sinks", lambda plan: seen.append(real(plan))
                        or seen[-1])
    skipping = engine.generate(images, prompts, method_args=args, **kw)
    assert any(0 < sum(s) < len(s) for s in seen)  # a decode step skips some edited layers
    monkeypatch.setattr(var, "may_have_image_sinks",
                        lambda plan: [True] * plan.fresh["var_sink"].shape[-1])
    every_flag = engine.generate(images, prompts, method_args=args, **kw)
    assert [r.token_ids for r in skipping] == [r.token_ids for r in every_flag]
    assert [r.logprobs for r in skipping] == [r.logprobs for r in every_flag]
    off = engine.generate(images, prompts, method_args={**args, "p": 1.0}, **kw)
    assert [r.logprobs for r in off] != [r.logprobs for r in skipping]  # VAR acts here


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_var_strength_zero_and_batch_invariance(arch, images, prompts):
    from veridical.decoding.methods.var import VAR

    engine = tiny_engine(arch)
    args = {"sink_dims": "3,7", "tau": 10.0, "summ": 0.01}
    base = engine.generate(images, prompts, max_new_tokens=6)
    off = engine.generate(images, prompts, method="var", method_args={**args, "p": 1.0},
                          max_new_tokens=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    no_dims = VAR(**{**args, "sink_dims": "none"})  # no token can be a sink: nothing installed
    assert no_dims.install(engine.context(), None) == [] and no_dims.attention_edits(engine.context()) == []
    assert VAR(**args).attention_edits(engine.context())
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, do_sample=True, seed=[1, 2, 3, 4]),
               dict(max_new_tokens=5, num_beams=2)):
        batch = engine.generate(images, prompts, method="var", method_args=args, **kw)
        seeds = kw.get("seed", [None] * 4)
        alone = [engine.generate(i, p, method="var", method_args=args,
                                 **{**kw, "seed": s}).token_ids
                 for i, p, s in zip(images, prompts, seeds)]
        assert [r.token_ids for r in batch] == alone


def test_fia_token_selection_and_modulation_exact():
    from veridical.decoding.methods.fia import head_modulation, select_tokens

    early = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.05, 0.4, 0.6]])
    late = torch.tensor([[1.0, 1.1, 0.9, 1.0, 9.0, 1.05, 0.95, 1.0]])
    top, bottom = select_tokens(early, late, ratio=0.25)  # 2 of 8: patches 3 and 7
    assert bottom.tolist() == [[False, False, False, False, True, False, False, False]]
    assert top.tolist() == [[False, False, False, True, False, False, False, True]]
    early2 = torch.tensor([[0.1, 0.5, 0.2, 0.3, 0.9, 0.05, 0.4, 0.6]])  # top-1 is an outlier
    top2, _ = select_tokens(early2, late, ratio=0.25)
    assert top2.tolist() == [[False, False, False, False, False, False, False, True]]
    m = head_modulation(torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
    assert m.tolist() == [[0.5, 1.5], [1.0, 1.0]]


def test_fia_equals_eager_reference_on_llava(images, prompts):
    """CLS attention recomputed from the vision tower's eager attentions, the selection and the
    per-head boost written out here, applied by the eager reference."""
    from veridical.decoding.method import Request
    from veridical.decoding.methods.fia import FIA, select_tokens
    from veridical.decoding.methods.pai import mapped_start

    engine = tiny_engine("llava")
    method = FIA(alpha=0.7, beta=0.3, head_modulation=False)
    requests = [Request(i, p) for i, p in zip(images, prompts)]
    data = method.prepare(engine.context(), requests)

    tower = engine.model.model.vision_tower
    pixels = torch.cat([encode(engine.processor, i, p)["pixel_values"]
                        for i, p in zip(images, prompts)])
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            att = tower(pixel_values=pixels, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    early, late = att[0][:, :, 0, 1:].mean(1), att[-2][:, :, 0, 1:].mean(1)
    top, bottom = select_tokens(early, late, 0.25)
    assert torch.equal(data["fia_top"], top) and torch.equal(data["fia_bottom"], bottom)
    assert top.any() and (top.sum(-1) <= 4).all()

    batch = engine.collate([encode(engine.processor, i, p) for i, p in zip(images, prompts)])
    image_id = engine.adapter.image_token_id(engine.model.config)
    image = batch["input_ids"] == image_id
    n_layers = len(engine.adapter.decoder_layers(engine.model))
    heads = engine.model.config.text_config.num_attention_heads
    layers = range(mapped_start(n_layers), n_layers)
    per_key = torch.zeros(image.shape)  # (B, kv): 0.7 on top, 0.3 on bottom image tokens
    for b in range(image.shape[0]):
        positions = image[b].nonzero().flatten()
        per_key[b, positions] = 0.7 * top[b].float() + 0.3 * bottom[b].float()
    factor = per_key[:, None, :].expand(-1, heads, -1)
    REFERENCE.update(image_keys=image.clone(), layers=set(layers),
                     key_factor={layer: factor for layer in layers})
    engine.model.set_attn_implementation({"text_config": "test_eager_pai"})
    try:
        ref = run_two_steps(engine, batch, [], image_id)
    finally:
        engine.model.set_attn_implementation({"text_config": "sdpa"})
        REFERENCE["key_factor"] = None
    info = RowInfo(["main"], n_slots=4)
    previous = use_edits(engine.model, True)
    try:
        rows = BatchState(engine.model, dict(batch), engine.cache_kw, info, image_id,
                     method.attention_edits(engine.context()), data)
        first = rows.prefill()
        second = rows.step(first.argmax(-1))
    finally:
        restore(engine.model, previous)
    plain = run_two_steps(engine, batch, [], image_id, {"image_keys": None})
    for a, b, c in zip((first, second), ref, plain):
        assert (a - b).abs().max() <= 1e-5
        assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_fia_strength_zero_and_batch_invariance(arch, images, prompts):
    engine = tiny_engine(arch)
    base = engine.generate(images, prompts, max_new_tokens=6)
    off = engine.generate(images, prompts, method="fia",
                          method_args={"alpha": 0.0, "beta": 0.0}, max_new_tokens=6)
    assert [r.token_ids for r in off] == [r.token_ids for r in base]
    args = {"head_modulation": False}
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=2)):
        batch = engine.generate(images, prompts, method="fia", method_args=args, **kw)
        alone = [engine.generate(i, p, method="fia", method_args=args, **kw).token_ids
                 for i, p in zip(images, prompts)]
        assert [r.token_ids for r in batch] == alone


def _refuse_profiling(monkeypatch):
    """Make every way of building a profile or calibration data fail loudly."""
    import veridical.heads as heads
    import veridical.heads.profile as profile
    import veridical.world as world

    def boom(*args, **kwargs):
        raise AssertionError("a request built a head profile or calibration data")

    for module, name in ((heads, "load_or_profile"), (profile, "load_or_profile"),
                         (heads, "profile_model"), (profile, "profile_model"),
                         (profile, "calibration_images"), (world, "builtin_world"),
                         (world, "generate_world")):
        monkeypatch.setattr(module, name, boom)


def test_fia_head_modulation_reads_the_profile(monkeypatch):
    from veridical.decoding.methods.fia import FIA

    _refuse_profiling(monkeypatch)
    engine = tiny_engine("llava")
    n_layers = len(engine.adapter.decoder_layers(engine.model))
    sens = [[1.0, 3.0, 2.0, 2.0]] * n_layers
    monkeypatch.setattr(engine, "head_profile", {"scores": {"visual_sensitivity": sens}})
    (edit,) = FIA().attention_edits(engine.context())
    assert edit.alpha[0].tolist() == pytest.approx([0.35, 1.05, 0.7, 0.7])
    assert edit.beta[0].tolist() == pytest.approx([0.15, 0.45, 0.3, 0.3])


def test_fia_without_a_profile_uses_uniform_modulation_and_warns_once(monkeypatch, caplog):
    import veridical.decoding.methods.fia as fia

    _refuse_profiling(monkeypatch)
    monkeypatch.setattr(fia, "WARNED", type(fia.WARNED)())  # no warning given yet
    engine = tiny_engine("llava")
    monkeypatch.setattr(engine, "head_profile", None)
    heads = engine.model.config.text_config.num_attention_heads
    n_layers = len(engine.adapter.decoder_layers(engine.model))
    with caplog.at_level("WARNING", logger=fia.__name__):
        (edit,) = fia.FIA().attention_edits(engine.context())
        (again,) = fia.FIA(alpha=0.5).attention_edits(engine.context())
    assert edit.modulation.tolist() == [[1.0] * heads] * n_layers
    assert torch.equal(again.modulation, edit.modulation)
    (message,) = [r.getMessage() for r in caplog.records]  # one warning per model
    assert "no head profile" in message and "veridical heads profile" in message
    (uniform,) = fia.FIA(head_modulation=False).attention_edits(engine.context())
    assert torch.equal(uniform.alpha, edit.alpha) and torch.equal(uniform.beta, edit.beta)


def test_var_auto_sink_dims_without_a_profile_names_the_command(monkeypatch, images, prompts):
    from veridical.decoding.methods.var import VAR

    _refuse_profiling(monkeypatch)
    engine = tiny_engine("llava")
    monkeypatch.setattr(engine, "head_profile", None)
    with pytest.raises(ValueError, match=r"no head profile.*veridical heads profile --model REF"):
        VAR().attention_edits(engine.context())
    with pytest.raises(ValueError, match="sink_dims=none"):
        engine.generate(images[:1], prompts[:1], method="var", max_new_tokens=2)
    # explicit dims, none, or p = 1 need no profile
    for args in ({"sink_dims": "none"}, {"sink_dims": "3,7"}, {"p": 1.0}):
        engine.generate(images[:1], prompts[:1], method="var", method_args=args,
                        max_new_tokens=2)
    monkeypatch.setattr(engine, "head_profile", {"sinks": {"dims": [3, 7]}})
    (edit,) = VAR().attention_edits(engine.context())  # auto: the profile's dims
    explicit = VAR(sink_dims="3,7")
    assert edit.layers() == explicit.attention_edits(engine.context())[0].layers()


def test_requests_never_build_a_head_profile(monkeypatch):
    """fia and var at their defaults on the built-in model read its shipped profile only, and
    give what the profile's numbers give (visual sensitivity; no sink dims: var acts on nothing)."""
    import veridical
    from veridical.bench import PROMPTS, bench_images
    from veridical.decoding.methods.fia import FIA, head_modulation
    from veridical.heads import head_scores

    _refuse_profiling(monkeypatch)
    engine = veridical.load("builtin:synthcoco-llava")
    assert engine.head_profile is not None and engine.head_profile["sinks"]["dims"] == []
    images, prompts = bench_images(2), PROMPTS[:2]
    kw = dict(max_new_tokens=6)
    fia = engine.generate(images, prompts, method="fia", **kw)
    (edit,) = FIA().attention_edits(engine.context())
    expected = head_modulation(head_scores(engine.head_profile, "visual_sensitivity"))
    assert torch.equal(edit.modulation, expected) and not torch.all(expected == 1)
    assert all(r.token_ids for r in fia)
    var = engine.generate(images, prompts, method="var", **kw)
    base = engine.generate(images, prompts, **kw)
    assert [r.token_ids for r in var] == [r.token_ids for r in base]


triton = pytest.importorskip("triton", reason="the fused-kernel route needs triton")


@pytest.mark.parametrize("method,args", [
    ("pai", {"gamma": 1.0, "alpha": 1.0}),
    ("fia", {"head_modulation": False, "alpha": 2.0}),
    ("var", {"sink_dims": "3,7", "tau": 10.0, "summ": 0.01}),
    ("vhr+pai", {"pai.gamma": 1.0}),
])
def test_fused_kernel_route_equals_the_torch_route(method, args, images, prompts):
    """Edited layers through veridical.kernels' Triton kernel (CPU interpreter here, compiled on
    a GPU) give the torch route's tokens; the kernel is checked against the reference on
    every code path in tests/test_kernels.py."""
    engine = tiny_engine("llava")
    kw = dict(method=method, method_args=args, max_new_tokens=5)
    torch_route = engine.generate(images[:2], prompts[:2], **kw)
    engine.attention_impl = "triton"
    calls = []
    from veridical import kernels

    real = kernels.attention
    try:
        kernels.attention = lambda *a, **k: calls.append(1) or real(*a, **k)
        fused = engine.generate(images[:2], prompts[:2], **kw)
    finally:
        kernels.attention = real
        engine.attention_impl = "auto"
    assert calls  # the kernel route was taken
    assert [r.token_ids for r in fused] == [r.token_ids for r in torch_route]
