"""``none``: the baseline. No branches, no attention edits, the model's own logits."""

from ..method import Method
from ..registry import register


@register
class NoMethod(Method):
    name = "none"
    description = "Baseline decoding: no mitigation."
