"""Attention rollout (Abnar & Zuidema, 2020): head-mean attention plus identity, rolled out."""
from __future__ import annotations

from .base import Method, Requirements, block_index, head_mean, register, rollout_row


@register
class Rollout(Method):
    name = "rollout"
    options = {"start_layer": 0, "row_normalize": True}

    def requirements(self, num_blocks, start_layer, row_normalize):
        block_index(start_layer, num_blocks, "start_layer")
        return Requirements()

    def __call__(self, trace, start_layer, row_normalize):
        start = block_index(start_layer, trace.num_blocks, "start_layer")

        def mixing(block, pooled):
            attention = trace.attention[block]
            return head_mean(trace.row(attention, block) if pooled else attention)

        return rollout_row(trace, mixing, start, row_normalize)
