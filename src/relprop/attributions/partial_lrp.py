"""Partial LRP (Voita et al., 2019): relevance of the last block's attention."""
from __future__ import annotations

from .base import Method, Requirements, head_mean, register


@register
class PartialLRP(Method):
    name = "partial_lrp"
    options = {"rules": "plain"}

    def requirements(self, num_blocks, rules):
        return Requirements(relevance_rules=rules, relevance_lowest=num_blocks - 1)

    def __call__(self, trace, rules):
        last = trace.num_blocks - 1
        return trace.to_first(head_mean(trace.row(trace.attention_relevance[last], last).clamp(min=0)), last)
