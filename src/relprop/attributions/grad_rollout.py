"""Generic attention explainability (Chefer et al., ICCV 2021): R = I; R += mean_h(max(0, ∇A ⊙ A)) R."""
from __future__ import annotations

from .base import Method, Requirements, head_mean, register, rollout_row


@register
class GradRollout(Method):
    name = "grad_rollout"
    options = {}

    def requirements(self, num_blocks):
        return Requirements(gradient_blocks=set(range(num_blocks)))

    def __call__(self, trace):
        def mixing(block, pooled):
            product = (trace.attention_grad[block] * trace.attention[block]).clamp(min=0)
            return head_mean(trace.row(product, block) if pooled else product)

        # R_L = (I + G_L) ... (I + G_1): the same un-normalised rollout product
        return rollout_row(trace, mixing, 0, normalize=False)
