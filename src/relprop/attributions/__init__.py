"""Explanation methods, one per module, registered by name."""
from . import (attn_gradcam, attnlrp, cp_lrp, grad_rollout, lrp, partial_lrp,  # noqa: F401  (registration)
               raw_attention, rollout, transformer_attribution)
from .base import Method, Requirements, Trace, get_method, method_names

__all__ = ["Method", "Requirements", "Trace", "get_method", "method_names"]
