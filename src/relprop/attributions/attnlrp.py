"""AttnLRP (Achtibat et al., ICML 2024): LRP with rules for the softmax and the attention's
bilinear products, in one modified backward pass (`relprop.gradient_rules`; exact against LXT)."""
from __future__ import annotations

from .base import Method, Requirements, register
from ..gradient_rules import check_biases


@register
class AttnLRP(Method):
    """Per token: the relevance at its embedding (text: the word-embedding output; images: the
    patch embedding's output, before the class token and position embeddings), summed over
    the hidden dimension. ``biases="absorb"`` (LXT's choice): biases keep their share of the
    relevance; ``"redistribute"``: a linear layer's bias keeps none, its share goes back to the
    layer's inputs in proportion to ``|x_i w_ji|``."""

    name = "attnlrp"
    options = {"biases": "absorb"}

    def requirements(self, num_blocks, biases):
        return Requirements(gradient_rules=self.name, biases=check_biases(biases))

    def __call__(self, trace, biases):
        return trace.input_relevance
