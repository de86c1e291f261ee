"""``m3id``: M3ID (no official code; as re-implemented in sangminwoo/RITUAL).

Branch: the same prompt without the image. Scores: ``z + (z - z_u) * (1 - g_t) / g_t`` with
``g_t = exp(-lam * t)`` and t the decode step (0 for the first token, so it starts as the
baseline and leans harder on the image as the text grows), APC with ``beta``.
"""

from ..contrast import contrast_delta, m3id_weight
from ..method import Branch, Method, Param, Request
from ..registry import register


def without_image(request: Request, rng) -> Request:
    return Request(None, request.prompt, request.system)


@register
class M3ID(Method):
    name = "m3id"
    description = "M3ID: contrast with a no-image branch, stronger as decoding proceeds."
    is_argmax_invariant = False
    params = (
        Param("lam", 0.02, "decay of g_t = exp(-lam * t) (0 = off)", low=0.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max", low=0.0, high=1.0),
    )

    def branches(self):
        return [Branch("no_image", make=without_image)]

    def delta(self, logits, branch_logits, step):
        weight = m3id_weight(step, self.args["lam"])
        return contrast_delta(logits, branch_logits["no_image"], weight)

    def plausibility(self):
        return self.args["beta"]
