"""``scmoe``: Self-Contrast Mixture-of-Experts (DavidFanzz/SCMoE ``decodingmethod/moe_utils.py``).

Branch: the same input with weak routing in every MoE layer: each token of the branch's rows
goes only to its ``rank``-th ranked expert (0 = the top expert; the official scripts use 2, the
third), with weight 1 (the routing weights renormalised over the one chosen expert). It runs in
the same batched forward as the real rows through forward hooks on the routers' public modules
(``veridical.decoding.routing``). Scores: ``(1 + beta) * z_strong - beta * z_weak``, APC with
``alpha`` on ``z_strong``; EOS is banned unless ``early_stop`` (as the reference does).

EOS ban, a deliberate difference: the reference bans one id (``eos_token_id``, by default
``tokenizer.eos_token_id``); here every id in ``engine.eos_ids`` gets -inf. The engine ends a
sequence on any of those ids, and many chat models have several (Qwen's ``<|im_end|>`` and
``<|endoftext|>``, Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``): banning only one would let
decoding stop on another, which is what ``early_stop = False`` exists to prevent. With a single
EOS id (the reference's models) the two are the same.
"""

import torch

from ..contrast import contrast_delta
from ..method import Branch, Method, Param
from ..registry import register
from ..routing import weak_routing_hooks


@register
class SCMoE(Method):
    name = "scmoe"
    description = "Self-contrast MoE: subtract a branch routed to a weaker expert (MoE models)."
    params = (
        Param("beta", 0.5, "contrast strength (0 = off; bounded so scores stay finite)", low=0.0,
              high=100.0),
        Param("alpha", 0.1, "APC: keep tokens with p >= alpha * p_max", low=0.0, high=1.0),
        Param("rank", 2, "the weak branch's expert: 0 = top-ranked, 2 = third", type=int, low=0),
        Param("early_stop", False, "allow EOS (the reference bans it)", type=bool),
    )

    def __init__(self, **args):
        super().__init__(**args)
        self._eos: list[int] = []

    def branches(self):
        return [Branch("weak")]

    def install(self, engine, rows):
        self._eos = list(engine.eos_ids)
        return weak_routing_hooks(engine, lambda: rows.mask("weak"), self.args["rank"])

    def delta(self, logits, branch_logits, step):
        out = contrast_delta(logits, branch_logits["weak"], self.args["beta"])
        if not self.args["early_stop"] and self._eos:
            ban = torch.zeros_like(out)
            ban[:, self._eos] = float("-inf")
            out = out + ban
        return out

    def plausibility(self):
        return self.args["alpha"]
