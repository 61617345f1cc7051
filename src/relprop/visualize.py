"""Heat-map overlays for images (as in the paper's figures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def heatmap_rgb(relevance, colormap: str = "jet") -> np.ndarray:
    """[H, W] map -> [H, W, 3] uint8 colours after min-max normalisation."""
    from matplotlib import colormaps

    from .result import normalize

    values = normalize(torch.as_tensor(_to_numpy(relevance), dtype=torch.float64)[None])[0].numpy()
    return (colormaps[colormap](values)[..., :3] * 255).astype(np.uint8)


def overlay(image, relevance, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend a heat-map over an image. ``image``: [H, W, 3] uint8 (or float in [0, 1]);
    ``relevance``: [H, W] at the image's size."""
    img = _to_numpy(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    heat = heatmap_rgb(relevance, colormap)
    if heat.shape[:2] != img.shape[:2]:
        raise ValueError(f"relevance {heat.shape[:2]} and image {img.shape[:2]} differ in size")
    return ((1 - alpha) * img + alpha * heat).round().astype(np.uint8)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    from .files import atomic_write

    return atomic_write(path, lambda handle: Image.fromarray(rgb).save(handle, format="PNG"))
