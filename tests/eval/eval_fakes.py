"""Test doubles for the benchmark tests: a tiny random ViT and a fake explainer with the
``relprop.Explainer`` interface (uniquely named so that ``import eval_fakes`` cannot pick
up another folder's helpers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SIZE = 32
PATCH = 8


def make_tiny_vit():
    """Random ViT on 32x32 inputs with 8x8 patches (a 4x4 grid) and 3 classes."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(config).eval()


@dataclass
class FakeExplanation:
    relevance: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor

    def upsampled(self, size: tuple[int, int]) -> torch.Tensor:
        if self.relevance.dim() == 3:  # pixel-level map
            return self.relevance
        b, t = self.relevance.shape
        side = int(round(t ** 0.5))
        grid = self.relevance.reshape(b, 1, side, side)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]


class FakeExplainer:
    """Deterministic maps from the input: "bright" scores each patch by its mean intensity,
    "dark" by minus that, "lrp" returns a pixel-level map, "nan" breaks the first map of a
    batch. Counts explained images."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls: list[tuple[str, int]] = []

    def explain(self, pixel_values: torch.Tensor, method: str, target=None) -> FakeExplanation:
        self.calls.append((method, len(pixel_values)))
        with torch.no_grad():
            logits = self.model(pixel_values=pixel_values).logits
        if target is None:
            target = logits.argmax(-1)
        target = torch.as_tensor(target).expand(len(pixel_values))
        intensity = pixel_values.mean(1)  # [B, H, W]
        if method == "lrp":
            relevance = intensity
        else:
            relevance = F.avg_pool2d(intensity[:, None], PATCH).flatten(1)
            if method == "dark":
                relevance = -relevance
            if method == "nan":  # a broken map for the first image of every batch
                relevance[0] = float("nan")
        return FakeExplanation(relevance, target, logits)

    @property
    def images(self) -> int:
        return sum(n for _, n in self.calls)


def random_image(rng: np.random.Generator, size=(40, 48)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def write_gtsegs_mat(path, items):
    """The layout of gtsegs_ijcv.mat (MATLAB v7.3): /value/img[i, 0] references an image
    stored transposed as (3, W, H); /value/gt[i, 0] references a 1x1 cell whose entry
    references the mask stored as (W, H)."""
    import h5py

    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = f.create_dataset("value/img", (len(items), 1), dtype=h5py.ref_dtype)
        gt = f.create_dataset("value/gt", (len(items), 1), dtype=h5py.ref_dtype)
        for i, (image, mask) in enumerate(items):
            img[i, 0] = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0)).ref
            mask_ref = refs.create_dataset(f"gt{i}", data=mask.T).ref
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = mask_ref
            gt[i, 0] = cell.ref


def seg_folder(tmp_path, mask_size=None, broken=False):
    """A mask folder of three 32x32 images, white object on black, with the object as mask: the
    pixel-level intensity map of the fake "lrp" method is a perfect segmentation. ``mask_size``
    gives o1 a mask of that size; ``broken`` adds an unreadable image."""
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(3):
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        mask[4 + 3 * k: 20 + k, 6: 25 - 2 * k] = 1
        Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=2)).save(root / "images" / f"o{k}.png")
        if k == 1 and mask_size:
            mask = np.array(Image.fromarray(mask).resize(mask_size[::-1], Image.NEAREST))
        Image.fromarray(mask).save(root / "masks" / f"o{k}.png")
    if broken:
        (root / "images" / "bad.png").write_bytes(b"\x89PNG broken")
    return root
