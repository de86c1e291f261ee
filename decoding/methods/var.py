"""``var``: Visual Attention Redistribution (seilk/VisAttnSink ``src/logic/logic.py``).

Sink tokens: in the layers from :func:`sink_from_layer` on (2 of 32, mapped to the model's
depth), a token is a sink when its weightless-RMSNorm'd layer input ``|h / rms(h)|`` exceeds
``tau`` on one of the model's massive-activation dimensions. As the reference code (its
``DimProspector`` runs at the prefill only), only the prompt's tokens can be sinks: a forward
pre-hook on each of those decoder layers records the flags of the prompt's tokens at the
prompt's forward, and generated tokens are never sinks. ``decode_sinks=true`` flags each
generated token too, in every forward that processes it (a generated token with a massive
activation then loses weight as the prompt's sinks do). A hook skips a layer at a forward
without image tokens when no cached image token is a sink there (VAR cannot act on that layer
any more, so those flags are never read). With no sink dimensions (the profile lists none, or
``sink_dims=none``) no token can be a sink, so VAR installs nothing at all.

Redistribution, in the same layers through the last one, for the real-input rows: at prefill
the text query positions after the image, at decode the new query. The reference code edits
the last layer (its ``except_last_layer`` setting, 1 in its configs, is shadowed by a class
attribute ``False`` of ``VARProcessor``, so the published numbers come from editing every
layer); ``last_layer=false`` skips it, as that setting intends. As the reference code does:
only in layers where the row has at least one image sink, a (head, query) is image-centric
when the sink share of its image attention is <= ``rho`` and its total image attention is >=
``summ``; there the weights of the SINK keys (text sinks and image sinks; other text keys are
left alone, which a summary's "text and sink weights" wording leaves ambiguous) are
multiplied by ``p`` and the removed mass ``(1 - p) * (their sum)`` goes to the non-sink image
keys in proportion to their weights. The sink share is ``image-sink weight / (image weight +
n_image * 1e-6)``: the reference's ``sum(image_attn + 1e-6)`` adds its epsilon once per image
token (``veridical.kernels.reference.VAR_EPS``, the same in every route: this module's torch
code, the numba loops, the torch reference and the Triton kernel). A layer where no row has an
image sink is left untouched at once (the rule changes nothing there; at decode steps
:func:`may_have_image_sinks` tells). The reference's code uses ``rho`` and ``p`` as 1 minus
the paper's (the author confirmed); the defaults here are the code's. ``p = 1`` is the baseline.

Where this implementation still differs from the reference code, and why:

- Sink dimensions are found per model by the ``heads`` profiler and ``tau`` is scaled to the
  model's width as the profiler does (20 is VAR's value for 4096-wide models); the reference
  reads a fixed table of dimensions for its LLaMA models. A table cannot cover other models.
  ``sink_dims="auto"`` (the default) reads them from the model's head profile
  (``engine.head_profile``, attached by ``veridical.load``); a model without one is an error
  (ValueError naming ``veridical heads profile``) rather than a profiling run inside a request;
  ``sink_dims="none"`` or explicit indices need no profile.
- The first sink layer is 2 of 32 mapped to the model's depth (``round(2 * L / 32)``); the
  reference starts at layer 2 at any depth. The same for 32 and 40 layers (LLaVA-1.5 7B, 13B);
  shallower models start earlier, in proportion.
- Batches: sink flags, image keys and query positions are per row, image keys come from the
  image-token mask (several images, left padding: padding keys weigh nothing) and a row's
  prefill queries are its real text queries after its last image token. The reference decodes
  one request with one image span.
- A row whose image tokens are all sinks is left as it is: there is no non-sink image key to
  receive the removed weight, and the reference divides 0 by 0 there (NaN weights).
- The rule runs in fp32; the reference runs it on the model dtype's weights (fp16), so a head
  whose share or image attention lies within fp16 rounding of ``rho`` or ``summ`` can be
  selected differently.

On float32 CPU tensors with numba installed (and the engine's ``attention_impl`` at ``"auto"``),
the sink flags and the decode-step rule run as compiled loops (:mod:`veridical.kernels.cpu`):
the same values, without the ~30 tensor operations per layer whose dispatch outweighs their
arithmetic on small models. ``attention_impl="torch"`` keeps the torch route. With
``decode_sinks=true``, at a decode step the loops do not ask :func:`may_have_image_sinks` (one
new token's flags, and the rule's own per-row check, cost less than the question): they flag
the new token in every edited layer, and the rule leaves rows without an image sink as they
are.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from veridical import kernels
from veridical.kernels import cpu
from veridical.kernels.reference import VAR_EPS

from ..attention import AttentionEdit, current_plan, row_logits
from ..headmath import RMS_EPS, effective_tau, rms_abs, sink_dims
from ..method import Method, Param
from ..registry import register


def sink_from_layer(n_layers: int) -> int:
    """VAR looks for sinks from layer 2 of LLaMA's 32; mapped to the model's depth."""
    return round(2 * n_layers / 32)


def var_layers(n_layers: int, last_layer: bool = True) -> range:
    """The layers VAR flags sinks in and edits: from :func:`sink_from_layer` through the last
    one (the reference code's behaviour), or through the one before when ``last_layer`` is
    False."""
    return range(sink_from_layer(n_layers), n_layers if last_layer else n_layers - 1)


def var_reweight(probs: torch.Tensor, image: torch.Tensor, sink: torch.Tensor,
                 queries: torch.Tensor, p: float, rho: float, summ: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on post-softmax weights ``probs`` (n, H, q, kv) with key groups ``image``/``sink``
    (n, kv) and the query positions to consider ``queries`` (n, q). Returns the new weights and
    the (n, H, q) mask of the (head, query) pairs that were redistributed."""
    image_sink, target = image & sink, image & ~sink
    groups = torch.stack([image, image_sink, sink, target], dim=-1).to(probs.dtype)  # (n, kv, 4)
    sums = torch.matmul(probs, groups[:, None])  # (n, H, q, 4): the four group masses
    total_image, sink_image, sink_mass, target_mass = sums.unbind(-1)
    eps = VAR_EPS * image.sum(-1, dtype=probs.dtype)[:, None, None]  # per image key (reference)
    share = sink_image / (total_image + eps)
    centric = ((share <= rho) & (total_image >= summ) & queries[:, None, :]
               & image_sink.any(-1)[:, None, None])
    changed = centric & (target_mass > 0) & (p != 1.0)
    # the sink keys (text or image) keep p of their weight; the removed (1 - p) * mass goes to
    # the non-sink image keys in proportion to their weights
    gain = (1 - p) * sink_mass / target_mass.clamp_min(1e-30)
    factor = torch.where(sink[:, None, None, :], p,
                         torch.where(target[:, None, None, :], 1 + gain[..., None], 1.0))
    return torch.where(changed[..., None], probs * factor, probs), changed


class VAREdit(AttentionEdit):
    def __init__(self, layers: range, p: float, rho: float, summ: float):
        self._layers = set(layers)
        self.p, self.rho, self.summ = p, rho, summ

    def layers(self) -> set[int]:
        return self._layers

    def kernel_args(self, layer, inputs, plan):
        from veridical.kernels import VAR as KernelVAR
        from veridical.kernels import key_groups

        q = inputs.query
        idx = plan.index.to(q.device)
        image = plan.image_keys.to(q.device)
        sink = plan.key_flags("var_sink", layer).to(q.device)
        n_q, n_k = q.shape[2], image.shape[1]
        rows = torch.zeros(q.shape[0], n_q, dtype=torch.bool, device=q.device)
        queries = _query_positions(inputs.attention_mask, idx, image[idx], n_q, n_k)
        rows[idx] = queries & (image[idx] & sink[idx]).any(-1, keepdim=True)
        return {"var": KernelVAR(groups=key_groups(image, sink), rows=rows, p=self.p,
                                 rho=self.rho, summ=self.summ, scale_text=False)}

    def edit_probs(self, layer, probs, plan):
        if kernels.route(probs, plan.impl) == "cpu":  # one fused loop instead of ~30 small ops; it leaves
            # rows without an image sink in this layer as they are
            keys = plan.remember("var_decode_keys", lambda: cpu.decode_keys(
                plan.image_keys, plan.key_state.get("var_sink"), plan.fresh["var_sink"],
                plan.index))
            return cpu.var_decode(probs, keys, layer, self.p, self.rho, self.summ)
        if not may_have_image_sinks(plan)[layer]:  # no image sink in this layer: nothing to do
            return probs
        image = plan.keys().to(probs.device)
        sink = plan.key_flags("var_sink", layer).to(probs.device)
        sink = sink if plan.all_rows else sink[plan.index]
        queries = torch.ones(len(probs), 1, dtype=torch.bool, device=probs.device)
        return var_reweight(probs, image, sink, queries, self.p, self.rho, self.summ)[0]

    def post_attention(self, layer, inputs, plan, out):
        if inputs.query.shape[2] == 1:  # a decode step: edit_probs did it
            return None
        idx = plan.index.to(out.device)
        image = plan.keys().to(out.device)
        sink = plan.key_flags("var_sink", layer)[plan.index].to(out.device)
        if not bool((image & sink).any()):  # no row has an image sink here: nothing changes
            return None
        logits = row_logits(inputs.module, inputs.query, inputs.key, inputs.attention_mask,
                            inputs.scaling, idx)  # (n, H, q, kv)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        n_q, n_k = probs.shape[-2:]
        queries = _query_positions(inputs.attention_mask, idx, image, n_q, n_k)
        new, changed = var_reweight(probs, image, sink, queries, self.p, self.rho, self.summ)
        if not changed.any():
            return None
        groups = getattr(inputs.module, "num_key_value_groups", 1)
        v = repeat_kv(inputs.value[idx], groups)
        o = torch.matmul(new.to(v.dtype), v).transpose(1, 2)  # (n, q, H, D)
        out = out.clone()
        out[idx] = torch.where(changed.transpose(1, 2)[..., None], o, out[idx])
        return out


def _query_positions(mask, idx, image, n_q, n_k) -> torch.Tensor:
    """(n, q): decode: the query; prefill: real (non-padding) text queries after the image."""
    if n_q == 1:
        return torch.ones(len(idx), 1, dtype=torch.bool, device=image.device)
    positions = torch.arange(n_k - n_q, n_k, device=image.device)  # key index of each query
    last_image = torch.where(image, torch.arange(n_k, device=image.device), -1).max(-1).values
    after = positions[None, :] > last_image[:, None]
    if mask is None:
        return after & (last_image[:, None] >= 0)
    real = mask[idx][:, 0, torch.arange(n_q), positions]  # a real query sees itself
    if real.dtype != torch.bool:
        real = real == 0
    return after & real & (last_image[:, None] >= 0)


def may_have_image_sinks(plan) -> list[bool]:
    """Per layer: can a row have an image sink in this forward? Only when the forward brings
    image tokens or the cache already holds an image sink in that layer. Image tokens come with
    the prompt, so elsewhere VAR never acts on the layer and the new tokens' sink flags there are
    not needed (they stay False). Call after the first sink hook of the forward ran."""

    def make():
        n_layers = plan.fresh["var_sink"].shape[-1]
        past = plan.key_state.get("var_sink")  # (R, kv_past, L), on the CPU
        n_past = 0 if past is None else past.shape[1]
        image = plan.image_keys
        if image is None:
            return [False] * n_layers
        if bool(image[:, n_past:].any()):
            return [True] * n_layers
        if past is None:
            return [False] * n_layers
        image_past = image[:, :n_past, None].to(past.device)
        return (past & image_past).flatten(0, 1).any(0).tolist()

    return plan.remember("var_image_sink_layers", make)


def sink_hooks(engine, dims: list[int], tau: float, layers: range, decode_sinks: bool = False
               ) -> list:
    """Forward pre-hooks on the decoder ``layers`` that record, per layer, which tokens of the
    prompt's forward (and, with ``decode_sinks``, of every later forward) are sinks, in the
    plan's (R, T, L) ``fresh["var_sink"]`` flags (False where not recorded)."""
    decoder = engine.adapter.decoder_layers(engine.model)
    width = engine.adapter.text_config(engine.model.config).hidden_size
    threshold = effective_tau(tau, width)
    index = torch.tensor(dims, dtype=torch.long)
    index_np = index.numpy()  # the same dims for the numba loop

    def hook(layer_idx):
        def record(module, args, kwargs):
            plan = current_plan()
            if plan is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]  # (R, T, D)
            flags = plan.fresh.get("var_sink")
            if flags is None:
                flags = torch.zeros(*hidden.shape[:2], len(decoder), dtype=torch.bool)
                plan.fresh["var_sink"] = flags
            if not decode_sinks and "var_sink" in plan.key_state:  # not the prompt's forward
                return
            loop = kernels.route(hidden, plan.impl) == "cpu"
            # a decode step's flags cost the loop less than asking whether they are needed
            if not (loop and hidden.shape[1] == 1) and not may_have_image_sinks(plan)[layer_idx]:
                return
            if loop:
                cpu.sink_flags_(hidden, index_np, threshold, RMS_EPS, flags, layer_idx)
            else:
                phi = rms_abs(hidden, dims=index.to(hidden.device))
                flags[:, :, layer_idx] = (phi > threshold).any(-1).cpu()
        return record

    return [decoder[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]


@register
class VAR(Method):
    name = "var"
    description = "Visual attention redistribution: move attention from sink tokens to the image."
    params = (
        Param("p", 0.6, "share kept by the sink keys in image-centric heads (1 = off)",
              low=0.0, high=1.0),
        Param("rho", 0.5, "largest sink share of image attention for an image-centric head",
              low=0.0, high=1.0),
        Param("summ", 0.2, "smallest total image attention for an image-centric head",
              low=0.0, high=1.0),
        Param("tau", 20.0, "sink threshold on |RMSNorm(h)| (scaled to the model's width)",
              low=0.0, low_open=True),
        Param("sink_dims", "auto", "massive-activation dims: 'auto' (profile), 'none', or "
              "comma-separated indices", type=str),
        Param("decode_sinks", False, "generated tokens can be sinks too (the reference flags "
              "the prompt's tokens only)", type=bool),
        Param("last_layer", True, "edit the last layer too, as the reference code does "
              "(false: skip it, as its except_last_layer setting intends)", type=bool),
    )

    def _dims(self, engine) -> list[int]:
        spec = self.args["sink_dims"].strip().lower()
        if spec == "none":
            return []
        if spec == "auto":  # the model's head profile, built ahead of time (never here)
            if engine.head_profile is None:
                raise ValueError(
                    "method 'var': no head profile for this model, so its sink dims are unknown; "
                    "run `veridical heads profile --model REF --data DIR` (or pass "
                    "sink_dims=... / sink_dims=none)")
            return sink_dims(engine.head_profile)
        try:
            dims = [int(d) for d in spec.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"method 'var': parameter 'sink_dims' = {spec!r} is not 'auto', "
                             "'none' or comma-separated integers") from None
        width = engine.adapter.text_config(engine.model.config).hidden_size
        if any(not 0 <= d < width for d in dims):
            raise ValueError(f"method 'var': parameter 'sink_dims' = {spec!r} has dims outside "
                             f"0..{width - 1} (the model's hidden size)")
        return dims

    def _acts(self, engine) -> bool:
        """p = 1, or no sink dims (no token can be a sink): VAR changes nothing, so it installs
        nothing and decoding costs what the baseline costs."""
        return self.args["p"] != 1.0 and bool(self._dims(engine))

    def _layers(self, engine) -> range:
        return var_layers(len(engine.adapter.decoder_layers(engine.model)),
                          self.args["last_layer"])

    def install(self, engine, rows):
        if not self._acts(engine):
            return []
        return sink_hooks(engine, self._dims(engine), self.args["tau"], self._layers(engine),
                          self.args["decode_sinks"])

    def attention_edits(self, engine):
        if not self._acts(engine):
            return []
        return [VAREdit(self._layers(engine), self.args["p"], self.args["rho"],
                        self.args["summ"])]
