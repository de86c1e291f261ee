"""``m3id``: M3ID (no official code; as re-implemented in sangminwoo/RITUAL).

Branch: the same prompt without the image. Scores: ``z + (z - z_u) * (1 - g_t) / g_t`` with
``g_t = exp(-lam * t)`` and t the decode step (0 for the first token, so it starts as the
baseline and leans harder on the image as the text grows), APC with ``beta``.

Range and overflow: ``0 <= lam <= 1``. The weight ``(1 - g_t) / g_t = exp(lam * t) - 1`` grows
without bound: ``math.expm1`` raises ``OverflowError`` once ``lam * t > 709`` and the float32
scores overflow to inf (then NaN) once ``lam * t`` passes about 88. So the exponent is capped at
``contrast.M3ID_MAX_EXPONENT = 30`` (``g_t >= e^-30``, about 1e-13): by then the contrast term outweighs ``z``
by some 13 orders of magnitude, far past float32's 7 digits, so greedy decoding and sampling
already pick the contrast's top token, and the cap changes nothing in practice but keeps every
score finite, for any allowed ``lam`` at any step. With ``lam = 1`` the weight is already e - 1
at the second token and about 8100 at the tenth; larger values would only make the switch from
baseline to pure contrast more abrupt, and are refused (``ValueError`` naming the range) rather
than silently clipped.
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
    params = (
        Param("lam", 0.02, "decay of g_t = exp(-lam * t) (0 = off)", low=0.0, high=1.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max", low=0.0, high=1.0),
    )

    def branches(self):
        return [Branch("no_image", make=without_image)]

    def delta(self, logits, branch_logits, step):
        weight = m3id_weight(step, self.args["lam"])
        return contrast_delta(logits, branch_logits["no_image"], weight)

    def plausibility(self):
        return self.args["beta"]
