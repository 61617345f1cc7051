"""Image preprocessing of the benchmarks, as the authors' torchvision transforms do it.

Images are resized straight to the model's input size (``Resize((H, W))``, bilinear, no
crop), turned into [0, 1] tensors (``ToTensor``), and normalised only right before the
model sees them, because the perturbation test removes pixels in [0, 1] space.
Masks are resized with nearest neighbour, together with their image; a mask of another size
than its image is refused (``checked_mask``) rather than stretched onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..errors import InputError


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` of the model's image processor."""

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a [B, 3, H, W] batch of [0, 1] images."""
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


def to_unit_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB image -> float [3, H, W] in [0, 1] at ``size`` = (H, W)."""
    resized = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)


def blurred(image: Image.Image) -> Image.Image:
    """The authors' blurred copy (``ImageNet_blur``): Gaussian(11) and median(11) blended 1:1."""
    image = image.convert("RGB")
    gauss = image.filter(ImageFilter.GaussianBlur(11))
    median = image.filter(ImageFilter.MedianFilter(11))
    return Image.blend(gauss, median, 0.5)


def checked_mask(mask: np.ndarray, image: Image.Image) -> np.ndarray:
    """``mask`` if it has ``image``'s height and width, else an ``InputError`` naming both sizes:
    a mask resized onto another image size no longer marks the object's pixels."""
    mask = np.asarray(mask)
    if mask.shape[:2] != (image.height, image.width):
        raise InputError(f"its mask is {mask.shape[0]}x{mask.shape[1]} but the image is {image.height}x{image.width} "
                         "(height x width); a mask must have its image's size")
    return mask


def mask_to_tensor(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Binary mask (> 0 is foreground) -> bool [H, W], nearest-neighbour resized."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.any(axis=-1)
    small = Image.fromarray((mask > 0).astype(np.uint8))
    resized = small.resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.array(resized) > 0)
