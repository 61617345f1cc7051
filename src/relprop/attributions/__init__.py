"""Explanation methods, one per module, registered by name."""
from . import (attn_gradcam, grad_rollout, lrp, partial_lrp, raw_attention,  # noqa: F401  (registration)
               rollout, transformer_attribution)
from .base import Method, Requirements, Trace, get_method, method_names

__all__ = ["Method", "Requirements", "Trace", "get_method", "method_names"]
