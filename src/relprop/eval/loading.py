"""Loading a classifier and the preprocessing the benchmarks apply to its inputs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..loading import load_image_classifier, preprocessor_settings
from .images import Normalization

log = logging.getLogger(__name__)


def load_model(spec: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``AutoModelForImageClassification`` from a local folder or a Hub id, in eval mode."""
    return load_image_classifier(spec).to(device)


def read_preprocessor_config(spec: str) -> dict[str, Any]:
    """The model's ``preprocessor_config.json`` as a dict (checked as ``relprop explain`` checks
    it), or {} when there is none (logged)."""
    return preprocessor_settings(spec, note=lambda line: log.warning("%s", line))


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


def image_size(model: torch.nn.Module, preprocessor: dict[str, Any]) -> tuple[int, int]:
    """(H, W) the model takes: its config's image_size (what the position embeddings were
    trained for), else the processor's size, else 224."""
    return (_pair(getattr(getattr(model, "config", None), "image_size", None))
            or _pair(preprocessor.get("size"))
            or (224, 224))


def normalization(preprocessor: dict[str, Any]) -> Normalization:
    """The processor's mean/std, defaulting to 0.5 (the paper's ViT)."""
    default = Normalization()
    mean = preprocessor.get("image_mean") or default.mean
    std = preprocessor.get("image_std") or default.std
    return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def patch_size(model: torch.nn.Module) -> int:
    """Patch side of a Hugging Face ViT/DeiT or a timm ViT."""
    size = getattr(getattr(model, "config", None), "patch_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    pair = _pair(size)
    if pair is None or pair[0] != pair[1]:
        raise UnsupportedModelError(f"cannot tell the (square) patch size of {type(model).__name__}")
    return pair[0]
