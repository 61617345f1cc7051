"""The paper's method: relevance-weighted attention gradients, rolled out over the blocks."""
from __future__ import annotations

from .base import Method, Requirements, block_index, head_mean, register, rollout_row


@register
class TransformerAttribution(Method):
    """Per block Ā = mean_h(max(0, ∇A ⊙ R_A)); the pooled row of prod (Ā + I) from
    ``start_layer`` up. ``row_normalize`` normalises each Ā + I (the authors' text code does,
    their vision code does not); ``rules`` picks the LRP rules for R_A."""

    name = "transformer_attribution"
    options = {"start_layer": 0, "row_normalize": False, "rules": "paper"}

    def requirements(self, num_blocks, start_layer, row_normalize, rules):
        start = block_index(start_layer, num_blocks, "start_layer")
        return Requirements(gradient_blocks=set(range(start, num_blocks)), relevance_rules=rules,
                            relevance_lowest=start)

    def __call__(self, trace, start_layer, row_normalize, rules):
        start = block_index(start_layer, trace.num_blocks, "start_layer")

        def mixing(block, token):
            if block in trace.reduced:            # streamed: Ā already head-averaged
                matrix = trace.reduced[block]
                return matrix if token is None else trace.row(matrix, block, token)
            product = (trace.attention_grad[block] * trace.attention_relevance[block]).clamp(min=0)
            product = product if token is None else trace.row(product, block, token)
            return head_mean(product)

        return rollout_row(trace, mixing, start, row_normalize)

    def reduce_block(self, grad, relevance, **options):
        return head_mean(grad.mul_(relevance).clamp_(min=0))       # grad: the caller's own, used once
