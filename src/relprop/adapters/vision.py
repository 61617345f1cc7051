"""Shared parts of the vision adapters: patch embedding, input checks, pixel relevance."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..rules import bounded_input_rule
from .base import Adapter, Prepared


class VisionAdapter(Adapter):
    """A ViT-style model: conv patch embedding, prefix tokens, learned positions."""

    # set by subclasses in __init__
    patch_weight: torch.Tensor      # [D, C, p, p]
    patch_bias: torch.Tensor
    prefix_tokens: list[torch.Tensor]   # [1, 1, D] each: class (+ distillation) token, views of the model's
    positions: torch.Tensor         # [1, T + P, D]
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_channels: int

    method_defaults: dict[str, dict[str, Any]] = {
        "attn_gradcam": {"scope": "cls_row"},
        "transformer_attribution": {"start_layer": 0, "row_normalize": False},
    }

    @property
    def num_prefix(self) -> int:
        return len(self.prefix_tokens)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    def batch_size(self, inputs: Any) -> int:
        return self._check(inputs).shape[0]

    def _check(self, pixel_values: Any) -> torch.Tensor:
        if isinstance(pixel_values, dict) or hasattr(pixel_values, "keys"):
            if "pixel_values" not in pixel_values:
                raise InputError("expected a tensor of pixel values or a mapping with 'pixel_values'")
            pixel_values = pixel_values["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel values must be a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            hint = " (add a batch dimension: x.unsqueeze(0))" if pixel_values.dim() == 3 else ""
            raise InputError(f"pixel values must have 4 dimensions [B, C, H, W], got shape {tuple(pixel_values.shape)}{hint}")
        if not pixel_values.is_floating_point():
            raise InputError(f"pixel values must be floating point and normalised as the model expects "
                             f"(got {pixel_values.dtype}); use the model's image processor")
        b, c, h, w = pixel_values.shape
        if b == 0:
            raise InputError("empty batch")
        if c != self.num_channels:
            raise InputError(f"the model expects {self.num_channels} channels, got {c} (shape {tuple(pixel_values.shape)})")
        if (h, w) != tuple(self.image_size):
            raise InputError(f"the model expects {self.image_size[0]}x{self.image_size[1]} images, got {h}x{w}; "
                             f"resize them (the model's image processor does)")
        return pixel_values

    def prepare(self, inputs: Any) -> Prepared:
        pixels = self._check(inputs).to(device=self.device, dtype=self.dtype)
        patches = F.conv2d(pixels, self.patch_weight, self.patch_bias, stride=self.patch_size)
        patches = patches.flatten(2).transpose(1, 2)
        # concatenated here, not once at construction: a copy made then would keep the
        # tokens' old values after an in-place update of the model
        prefix = [token.expand(pixels.shape[0], -1, -1) for token in self.prefix_tokens]
        tokens = torch.cat([*prefix, patches], dim=1)
        hidden = tokens + self.positions
        n = hidden.shape[1]
        valid = torch.ones(pixels.shape[0], n, dtype=torch.bool, device=self.device)
        content = torch.arange(self.num_prefix, n, device=self.device)
        return Prepared(hidden, valid, content, {"pixels": pixels, "tokens": tokens})

    def input_relevance(self, prepared: Prepared, relevance: torch.Tensor, rules) -> torch.Tensor:
        """Relevance of every pixel, summed over colour channels: [B, H, W]."""
        tokens, pixels = prepared.extras["tokens"], prepared.extras["pixels"]
        rel_tokens, _ = rules.add(tokens, self.positions.expand_as(tokens), relevance)
        rel_patches = rel_tokens[:, self.num_prefix:]
        unfolded = F.unfold(pixels, self.patch_size, stride=self.patch_size).transpose(1, 2)
        low = pixels.flatten(1).min(dim=1).values
        high = pixels.flatten(1).max(dim=1).values
        weight = self.patch_weight.flatten(1)
        rel_pixels = bounded_input_rule(unfolded, weight, rel_patches, low, high)
        rel_pixels = F.fold(rel_pixels.transpose(1, 2), pixels.shape[-2:], self.patch_size, stride=self.patch_size)
        return rel_pixels.sum(dim=1)
