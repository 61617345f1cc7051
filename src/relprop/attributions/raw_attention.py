"""Raw attention of the last block: head mean of the pooled attention row (over block 0's tokens)."""
from __future__ import annotations

from .base import Method, Requirements, head_mean, register


@register
class RawAttention(Method):
    name = "raw_attention"
    options = {}

    def requirements(self, num_blocks):
        return Requirements()

    def __call__(self, trace):
        last = trace.num_blocks - 1
        return trace.to_first(head_mean(trace.row(trace.attention[last], last)), last)
