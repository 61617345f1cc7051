"""Full LRP down to the model input (pixels, or the encoder input for text)."""
from __future__ import annotations

from .base import Method, Requirements, register


@register
class LRP(Method):
    name = "lrp"
    options = {"rules": "plain"}
    input_level = True

    def requirements(self, num_blocks, rules):
        return Requirements(relevance_rules=rules, relevance_lowest=0, input_relevance=True)

    def __call__(self, trace, rules):
        return trace.input_relevance
