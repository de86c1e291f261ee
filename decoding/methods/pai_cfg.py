"""``pai_cfg``: the guidance half of PAI (LALBJ/PAI ``CFG.py``).

Branch: the prompt without the image (attention edits are off in that branch when composed
with ``pai``'s attention half). Scores on log-probs: ``g * (s - s_text) + s_text``, APC with
``beta`` on ``s``. ``gamma`` = 1.1 (the README; the evaluation scripts use 2). gamma = 1 is the
baseline.
"""

from ..contrast import contrast_delta
from ..method import Branch, Method, Param
from ..registry import register
from .m3id import without_image


@register
class PAICFG(Method):
    name = "pai_cfg"
    description = "PAI's guidance: amplify the image's effect against a text-only branch."
    params = (
        Param("gamma", 1.1, "guidance scale g (1 = off; bounded so scores stay finite)", low=1.0,
              high=100.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max", low=0.0, high=1.0),
    )

    def branches(self):
        return [Branch("text_only", make=without_image)]

    def delta(self, logits, branch_logits, step):
        return contrast_delta(logits, branch_logits["text_only"], self.args["gamma"] - 1.0)

    def plausibility(self):
        return self.args["beta"]
