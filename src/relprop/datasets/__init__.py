"""Benchmark datasets with ground-truth relevance masks."""

from relprop.datasets.fashion_canvas import (
    CLASS_NAMES,
    CanvasConfig,
    FashionCanvasDataset,
    FashionPairDataset,
    load_split,
    make_canvas,
    make_pair_canvas,
    read_idx,
)

__all__ = [
    "CLASS_NAMES",
    "CanvasConfig",
    "FashionCanvasDataset",
    "FashionPairDataset",
    "load_split",
    "make_canvas",
    "make_pair_canvas",
    "read_idx",
]
