"""``icd``: Instruction Contrastive Decoding (p1k0pan/ICD).

Branch: the same image and question, with the conversation's system message replaced by a
"disturbance" role (default: the confused-objects-detector role;
``veridical.decoding.branches.ICD_DISTURBANCES`` lists the five the paper sweeps). Scores: VCD's
formula ``(1 + alpha) * z - alpha * z_disturbed``, APC with ``beta``.
"""

from functools import partial

from ..branches import DEFAULT_DISTURBANCE
from ..contrast import contrast_delta
from ..method import Branch, Method, Param, Request
from ..registry import register


def _disturbed(request: Request, rng, role: str) -> Request:
    return Request(request.image, request.prompt, system=role)


@register
class ICD(Method):
    name = "icd"
    description = "Instruction contrastive decoding: subtract a disturbed-instruction branch."
    params = (
        Param("alpha", 1.0, "contrast strength (0 = off; bounded so scores stay finite)", low=0.0,
              high=100.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max", low=0.0, high=1.0),
        Param("role", DEFAULT_DISTURBANCE, "the disturbance instruction (system message)",
              type=str),
    )

    def __init__(self, **args):
        super().__init__(**args)
        if not self.args["role"].strip():
            raise ValueError("method 'icd': parameter 'role' is empty; give a disturbance "
                             "instruction or leave the default")

    def branches(self):
        return [Branch("disturbed", make=partial(_disturbed, role=self.args["role"]))]

    def delta(self, logits, branch_logits, step):
        return contrast_delta(logits, branch_logits["disturbed"], self.args["alpha"])

    def plausibility(self):
        return self.args["beta"]
