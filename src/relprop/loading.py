"""Load a user's model (local folder or hub id) and its preprocessing, offline-safe."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ModelLoadError, RelpropError

DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)


def _from_pretrained(factory, name: str, **kwargs):
    """``factory.from_pretrained`` for a local folder or a Hub id, with errors that say what to do."""
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{name} is a file; pass the model folder (config.json + weights)")
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path
    if not local.exists() and (local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"model folder not found: {name}")
    try:
        if local.exists():
            return factory.from_pretrained(str(local), local_files_only=True, **kwargs)
        return factory.from_pretrained(name, **kwargs)
    except OSError as error:
        where = ("the folder has no loadable model (config.json + weights)" if local.exists() else
                 "it is not a local folder and could not be fetched from the Hugging Face Hub "
                 "(offline? pass a folder saved with save_pretrained(), or download it first)")
        raise ModelLoadError(f"cannot load {name!r}: {where}. Details: {error}") from None


def load_image_classifier(name: str):
    from transformers import AutoModelForImageClassification

    return _from_pretrained(AutoModelForImageClassification, name).eval()


def load_text_classifier(name: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = _from_pretrained(AutoModelForSequenceClassification, name).eval()
    return model, _from_pretrained(AutoTokenizer, name)


@dataclass
class ImagePreprocessor:
    """The model's own image preprocessing (its preprocessor_config.json), or ViT defaults:
    resize to the model's input size, scale to [0, 1], normalise with mean = std = 0.5."""

    transform: Callable
    mean: Sequence[float]
    std: Sequence[float]
    normalizes: bool

    @classmethod
    def for_model(cls, name: str, model) -> "ImagePreprocessor":
        from transformers import AutoImageProcessor

        processor = None
        if Path(name).expanduser().joinpath("preprocessor_config.json").exists() or not Path(name).exists():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    processor = AutoImageProcessor.from_pretrained(str(Path(name).expanduser()) if Path(name).exists()
                                                                   else name, backend="pil")
            except (OSError, ValueError, TypeError):
                processor = None
        if processor is None:
            try:  # transformers 5: the PIL backend (the default one needs torchvision)
                from transformers import ViTImageProcessorPil as ViTImageProcessor
            except ImportError:
                from transformers import ViTImageProcessor
            size = getattr(model.config, "image_size", 224)
            processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(DEFAULT_MEAN),
                                          image_std=list(DEFAULT_STD))
        normalizes = bool(getattr(processor, "do_normalize", True))
        return cls(lambda images: processor(images=images, return_tensors="pt")["pixel_values"],
                   list(getattr(processor, "image_mean", DEFAULT_MEAN)), list(getattr(processor, "image_std", DEFAULT_STD)),
                   normalizes)

    def __call__(self, images) -> torch.Tensor:
        return self.transform(images)

    def to_display(self, pixel_values: torch.Tensor) -> np.ndarray:
        """[B, 3, H, W] model input -> [B, H, W, 3] uint8 image as the model saw it."""
        x = pixel_values.detach().float().cpu()
        if self.normalizes:
            x = x * torch.tensor(self.std)[:, None, None] + torch.tensor(self.mean)[:, None, None]
        return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def read_image(path: str | Path):
    """An RGB PIL image, or a RelpropError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise RelpropError(f"cannot read image {str(path)!r}: {error}") from None
