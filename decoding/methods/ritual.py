"""``ritual``: RITUAL (sangminwoo/RITUAL): a randomly transformed copy of the image as a
complementary branch.

Branch: the PIL image with ONE transform drawn uniformly per request (flips, rotation, colour
jitter, blur, resized crop; ``veridical.decoding.branches.ritual_transform``), seeded per request.
Scores: ``z + alpha_pos * z_T``, APC with ``beta`` on the real logits. ``ritual+vcd`` adds VCD's
term, as in the paper.
"""

from ..branches import ritual_transform
from ..contrast import ritual_delta
from ..method import Branch, Method, Param, Request
from ..registry import register


def _transformed(request: Request, rng) -> Request:
    if request.image is None:
        return request
    image, _ = ritual_transform(request.image, rng)
    return Request(image, request.prompt, request.system)


@register
class Ritual(Method):
    name = "ritual"
    description = "RITUAL: add the logits of a randomly transformed image (APC on z)."
    params = (
        Param("alpha_pos", 3.0, "weight of the transformed-image branch (0 = off; bounded so "
              "scores stay finite)", low=0.0, high=100.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max", low=0.0, high=1.0),
    )

    def branches(self):
        return [Branch("transformed", make=_transformed)]

    def delta(self, logits, branch_logits, step):
        return ritual_delta(branch_logits["transformed"], self.args["alpha_pos"])

    def plausibility(self):
        return self.args["beta"]
