"""The result of an explanation and the helpers a user needs to look at it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .errors import InputError


@dataclass
class Internals:
    """Per-block tensors of one explanation (``explain(..., keep_internals=True)``).

    Attributes
    ----------
    attention : list of torch.Tensor
        Per block, the attention probabilities A [B, H, N, N] (N tokens, prefix tokens included).
    attention_grad : dict of int to torch.Tensor
        Block -> ∇A, the gradient of the explained score at A, for the blocks the method needed.
    attention_relevance : dict of int to torch.Tensor
        Block -> R_A, the relevance of A, for the blocks the method needed.
    """

    attention: list[torch.Tensor]
    attention_grad: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_relevance: dict[int, torch.Tensor] = field(default_factory=dict)


def normalize(x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Min-max normalise each sample (the first dimension) to [0, 1].

    Parameters
    ----------
    x : torch.Tensor
        [B, ...] maps.
    keep : torch.Tensor, optional
        Bool, the shape of ``x``: the entries whose minimum and maximum count (e.g. real
        tokens, not padding); the others get the same affine map and are not clipped.

    Returns
    -------
    torch.Tensor
        The normalised maps. A constant map (or one with no kept entry) becomes all zeros; a map
        holding NaN or inf stays non-finite, so a broken map is never mistaken for a flat one.
    """
    flat = x.flatten(1)
    if keep is None:
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        empty = torch.zeros_like(low, dtype=torch.bool)
    else:
        mask = keep.expand_as(x).flatten(1)
        low = flat.masked_fill(~mask, float("inf")).min(dim=1).values
        high = flat.masked_fill(~mask, float("-inf")).max(dim=1).values
        empty = ~mask.any(dim=1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    flat_map = ((high - low) == 0) | empty
    low = torch.where(empty, torch.zeros_like(low), low).reshape(shape)
    span = torch.where(flat_map, torch.ones_like(high), high - low.flatten()).reshape(shape)
    return torch.where(flat_map.reshape(shape), torch.zeros_like(x), (x - low) / span)


@dataclass
class Explanation:
    """The result of `Explainer.explain`: one map per sample, and what it explains.

    Attributes
    ----------
    relevance : torch.Tensor
        [B, T]: one score per patch (vision: the patches in the model's order, prefix tokens
        such as [CLS] excluded) or per token position (text: padding is exactly 0); [B, H, W]
        per pixel for the pixel-level method ``lrp`` on images.
    target : torch.Tensor or None
        [B] the explained class per sample; None for a callable target.
    logits : torch.Tensor or None
        [B, classes] the model's class scores (None for a model without them).
    method : str
        The method's name.
    options : dict
        The method's options as used (defaults filled in).
    grid : tuple of int, optional
        The patch grid (h, w) of a vision model's token-level map.
    input_size : tuple of int, optional
        The image size (H, W) the model saw.
    mask : torch.Tensor, optional
        [B, L] bool, the real (not padding) tokens of a text batch.
    internals : Internals, optional
        Per-block A, ∇A and R_A, with ``keep_internals=True``.
    modality : str
        ``"image"`` or ``"text"``.
    """

    relevance: torch.Tensor            # [B, T] per patch/token, or [B, H, W] per pixel (lrp)
    target: torch.Tensor               # [B] explained class
    logits: torch.Tensor               # [B, classes]
    method: str
    options: dict[str, Any]
    grid: Optional[tuple[int, int]] = None          # patch grid (vision, token-level maps)
    input_size: Optional[tuple[int, int]] = None    # image size (vision)
    mask: Optional[torch.Tensor] = None             # [B, L] real tokens (text)
    internals: Optional[Internals] = None
    modality: str = "image"                         # "image" or "text"

    def __len__(self) -> int:
        return self.relevance.shape[0]

    @property
    def is_pixel_level(self) -> bool:
        return self.relevance.dim() == 3

    def _image_only(self, what: str) -> None:
        if self.modality == "text" or (self.grid is None and not self.is_pixel_level):
            raise InputError(f"{what} is for image explanations; this one is of a text model: its "
                             "relevance is one score per token in .relevance [B, L] (padding is 0), "
                             "and .normalized() scales it to [0, 1]")

    def as_grid(self) -> torch.Tensor:
        """Patch scores on the patch grid (image explanations only).

        Returns
        -------
        torch.Tensor
            [B, h, w]; a pixel-level map ([B, H, W]) as it is.
        """
        self._image_only("as_grid()")
        if self.is_pixel_level or self.grid is None:       # no grid: a pixel-level map (_image_only)
            return self.relevance
        return self.relevance.reshape(-1, *self.grid)

    def upsampled(self, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The map at the image size, bilinearly upsampled from the patch grid as the paper's
        scripts do (``F.interpolate(..., mode='bilinear')``; image explanations only).

        Parameters
        ----------
        size : tuple of int, optional
            (H, W); default: the size of the image the model saw.

        Returns
        -------
        torch.Tensor
            [B, H, W]; a pixel-level map of that size as it is.
        """
        self._image_only("upsampled()")
        size = size or self.input_size
        grid = self.as_grid()
        if size is None or tuple(grid.shape[-2:]) == tuple(size):
            return grid
        return F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def normalized(self) -> torch.Tensor:
        """Relevance min-max normalised to [0, 1] per sample (see `normalize`).

        Returns
        -------
        torch.Tensor
            The shape of ``relevance``; for text, padding is ignored for the minimum and
            maximum and set to 0.
        """
        if self.mask is None:
            return normalize(self.relevance)
        return normalize(self.relevance, self.mask).masked_fill(~self.mask, 0)
