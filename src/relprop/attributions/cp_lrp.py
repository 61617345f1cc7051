"""CP-LRP (Ali et al., ICML 2022): LRP that passes no relevance through the attention weights
(nor through the gate of a gated MLP), as LXT implements it (`relprop.gradient_rules`)."""
from __future__ import annotations

from .attnlrp import AttnLRP
from .base import register


@register
class CpLRP(AttnLRP):
    """As `attnlrp` (same token convention and ``biases`` option), with the attention
    probabilities and the activated gates held constant."""

    name = "cp_lrp"
