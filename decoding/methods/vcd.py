"""``vcd``: Visual Contrastive Decoding (DAMO-NLP-SG/VCD).

Branch: the processor's normalised pixel tensor with forward-diffusion noise at ``noise_step``
(``veridical.decoding.branches.vcd_noise``, seeded per request). Scores:
``(1 + alpha) * z - alpha * z_noised``, then APC with ``beta`` on the real logits.
"""

from functools import partial

from ..branches import vcd_noise
from ..contrast import contrast_delta
from ..method import Branch, Method, Param
from ..registry import register


@register
class VCD(Method):
    name = "vcd"
    description = "Visual contrastive decoding: subtract a noised-image branch (APC on z)."
    params = (
        Param("alpha", 1.0, "contrast strength (0 = off; bounded so scores stay finite)", low=0.0,
              high=100.0),
        Param("beta", 0.1, "APC: keep tokens with p >= beta * p_max (0 = keep all)", low=0.0,
              high=1.0),
        Param("noise_step", 500, "diffusion step of the noise (0..999)", type=int, low=0,
              high=999),
    )

    def branches(self):
        return [Branch("noised", on_pixels=partial(_noise, step=self.args["noise_step"]))]

    def delta(self, logits, branch_logits, step):
        return contrast_delta(logits, branch_logits["noised"], self.args["alpha"])

    def plausibility(self):
        return self.args["beta"]


def _noise(pixel_values, generator, step):
    return vcd_noise(pixel_values, generator, step)
