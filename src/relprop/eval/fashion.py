"""Glue between the cluttered Fashion-MNIST canvases (``relprop.datasets.fashion_canvas``)
and the benchmark runners.

* ``canvas_images``: ``LabelledImage``-like samples (``id``, ``label``, ``load()`` -> PIL
  RGB image) for ``run_perturbation``; the canvas is made in memory when loaded.
* ``canvas_segmentation``: ``SegmentationSample``s whose mask is the item's pixel mask,
  for ``run_segmentation``.
* ``pair_samples``: two-item canvases (items of different classes, disjoint masks) for
  ``class_specificity.run_class_specificity``.

Sample ids are ``"<split>/<seed>/<index>"``; the canvas settings belong in the run's
identity (``canvas_identity``) so that records made with other canvases are never mixed.
"""

from __future__ import annotations

import os
from functools import partial
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from relprop.datasets.fashion_canvas import (CanvasConfig, load_split, make_canvas, make_pair_canvas,
                                             resolve_root, split_files)

from ..errors import InputError
from .datasets import SegmentationSample


def _labels(split: str, root) -> np.ndarray:
    """The split's labels; missing or broken files are an ``InputError`` (with the install hint)."""
    try:
        return load_split(split, root)[1]
    except (OSError, ValueError) as error:  # FileNotFoundError with the install hint, a corrupt idx file
        raise InputError(str(error)) from None


def _ids(split: str, seed: int, n: int | None, start: int, root) -> range:
    total = len(_labels(split, root))  # fails early, with the install hint, if data are missing
    stop = total if n is None else start + n
    if not 0 <= start <= stop <= total:
        raise InputError(f"canvases {start}..{stop - 1} out of range for the {total} {split} items")
    return range(start, stop)


def _sample_id(split: str, seed: int, index: int) -> str:
    return f"{split}/{seed}/{index}"


@dataclass(frozen=True)
class CanvasImage:
    """One single-item canvas as a classification sample (the ``LabelledImage`` interface)."""

    id: str
    label: int
    split: str
    index: int
    seed: int = 0
    config: CanvasConfig = field(default=CanvasConfig(), repr=False)
    root: str | os.PathLike | None = field(default=None, repr=False)

    @property
    def sources(self) -> tuple[Path, ...]:
        return split_files(self.split, self.root)

    def load(self) -> Image.Image:
        image, _, _ = make_canvas(self.split, self.index, self.seed, self.config, self.root)
        return Image.fromarray(image)


@dataclass(frozen=True)
class PairSample:
    """One two-item canvas; ``load()`` returns (image, (mask_a, mask_b), (label_a, label_b))."""

    id: str
    split: str
    index: int
    seed: int = 0
    config: CanvasConfig = field(default=CanvasConfig(), repr=False)
    root: str | os.PathLike | None = field(default=None, repr=False)

    @property
    def sources(self) -> tuple[Path, ...]:
        return split_files(self.split, self.root)

    def load(self) -> tuple[Image.Image, tuple[np.ndarray, np.ndarray], tuple[int, int]]:
        image, masks, labels = make_pair_canvas(self.split, self.index, self.seed, self.config, self.root)
        return Image.fromarray(image), masks, labels


def canvas_images(n: int | None = None, split: str = "test", seed: int = 0, config: CanvasConfig = CanvasConfig(),
                  root: str | os.PathLike | None = None, start: int = 0) -> list[CanvasImage]:
    """Canvases ``start .. start + n - 1`` (all of the split when ``n`` is None), labelled
    with their item's class."""
    labels = _labels(split, root)
    return [CanvasImage(_sample_id(split, seed, i), int(labels[i]), split, i, seed, config, root)
            for i in _ids(split, seed, n, start, root)]


def canvas_segmentation(n: int | None = None, split: str = "test", seed: int = 0,
                        config: CanvasConfig = CanvasConfig(), root: str | os.PathLike | None = None,
                        start: int = 0) -> list[SegmentationSample]:
    """The same canvases as ``canvas_images`` with the item's pixel mask as foreground."""
    def loader(index: int) -> tuple[Image.Image, np.ndarray]:
        image, mask, _ = make_canvas(split, index, seed, config, root)
        return Image.fromarray(image), mask.astype(np.uint8)

    sources = split_files(split, root)
    return [SegmentationSample(_sample_id(split, seed, i), partial(loader, i), sources)
            for i in _ids(split, seed, n, start, root)]


def pair_samples(n: int | None = None, split: str = "test", seed: int = 0, config: CanvasConfig = CanvasConfig(),
                 root: str | os.PathLike | None = None, start: int = 0) -> list[PairSample]:
    """Pair canvases ``start .. start + n - 1``: item ``index`` plus an item of another class."""
    return [PairSample(_sample_id(split, seed, i), split, i, seed, config, root)
            for i in _ids(split, seed, n, start, root)]


def canvas_identity(split: str = "test", seed: int = 0, config: CanvasConfig = CanvasConfig(),
                    root: str | os.PathLike | None = None, kind: str = "fashion_canvas") -> dict[str, Any]:
    """What the canvases depend on, for a run's ``identity``."""
    return {"data": kind, "split": split, "canvas_seed": seed, "canvas_config": asdict(config),
            "data_root": str(resolve_root(root).resolve())}
