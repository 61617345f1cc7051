"""Grad-CAM on the last block's attention (the paper's GradCAM baseline)."""
from __future__ import annotations

import torch

from ..errors import OptionError
from ..result import normalize as normalize_maps
from .base import Method, Requirements, register

SCOPES = ("cls_row", "matrix")


@register
class AttnGradCAM(Method):
    """Per head weight w_h = mean of ∇A; map = max(0, mean_h(A·w_h)), min-max normalised.

    ``scope="cls_row"`` (the authors' vision code): w_h averages the pooled token's gradient
    row over the content tokens, and the map is that row. ``scope="matrix"`` (their text
    code): w_h averages the whole (unpadded) matrix, the map is computed and normalised on
    the whole matrix, and the pooled row is returned.
    """

    name = "attn_gradcam"
    options = {"scope": "cls_row", "normalize": True}

    def requirements(self, num_blocks, scope, normalize):
        if scope not in SCOPES:
            raise OptionError(f"scope must be one of {SCOPES}, got {scope!r}")
        last = num_blocks - 1
        return Requirements(gradient_blocks={last}, all_rows=scope == "matrix")

    def __call__(self, trace, scope, normalize):
        last = trace.num_blocks - 1
        attention, grad = trace.attention[last], trace.attention_grad[last]
        content = torch.zeros_like(trace.valid)
        content[:, trace.content] = True
        content &= trace.valid
        if scope == "cls_row":
            grad_row = trace.row(grad, last)                                  # [B, H, N]
            weights = (grad_row * content[:, None]).sum(-1) / content.sum(-1)[:, None]
            cam = (trace.row(attention, last) * weights[..., None]).mean(dim=1).clamp(min=0)
            return normalize_maps(cam, content) if normalize else cam
        pair = trace.valid[:, :, None] & trace.valid[:, None, :]             # [B, N, N]
        weights = (grad * pair[:, None]).sum((-1, -2)) / pair.sum((-1, -2))[:, None]
        cam = (attention * weights[..., None, None]).mean(dim=1).clamp(min=0)
        if normalize:
            cam = normalize_maps(cam, pair)
        return trace.row(cam, last)
