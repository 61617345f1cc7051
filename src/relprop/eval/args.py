"""Command-line pieces the vision benchmarks share: the model and data options, loading the
model with its preprocessing, and what a run's identity and provenance hold."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..cli import positive_int
from ..errors import UnsupportedModelError, UsageError
from ..loading import bundled_model, model_help
from . import datasets, fashion, loading
from .images import Normalization
from .runner import logits_function

log = logging.getLogger(__name__)


def add_model_data(parser: argparse.ArgumentParser, kinds: tuple[str, ...] = ("image",)) -> None:
    """--model (of ``kinds``, see `relprop.loading.KINDS`), --data and the preprocessing options of
    an image benchmark."""
    parser.add_argument("--model", required=True, help=model_help(*kinds))
    parser.add_argument("--data", required=True, help="dataset path (see --format)")
    parser.add_argument("--image-size", type=positive_int, nargs="+", metavar="N",
                        help="input H [W] (default: the model config's image_size)")
    parser.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default: the model's processor)")
    parser.add_argument("--std", type=float, nargs=3, help="normalisation std (default: the model's processor)")


def load_vision(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, tuple[int, int],
                                                                           Normalization]:
    """The model on ``device``, the input size and the normalisation the run uses."""
    model = loading.load_model(args.model, device)
    size, norm = _preprocessing(args, model)
    return model, size, norm


def _preprocessing(args: argparse.Namespace, model: torch.nn.Module) -> tuple[tuple[int, int], Normalization]:
    preprocessor = loading.read_preprocessor_config(args.model)
    model_size = loading.image_size(model, preprocessor)
    if args.image_size:
        if len(args.image_size) > 2:
            raise UsageError(f"--image-size takes H or H W, got {len(args.image_size)} numbers")
        size = (args.image_size[0], args.image_size[-1])
    else:
        size = model_size
    _check_input_size(model, size, model_size, given=bool(args.image_size))
    norm = loading.normalization(preprocessor)
    for option, values in (("--mean", args.mean), ("--std", args.std)):
        if values and not all(math.isfinite(v) for v in values):
            raise UsageError(f"{option} takes three finite numbers, got {values}")
    if args.std and 0 in args.std:
        raise UsageError(f"--std must be non-zero (it divides), got {args.std}")
    norm = Normalization(tuple(args.mean) if args.mean else norm.mean, tuple(args.std) if args.std else norm.std)
    return size, norm


@torch.no_grad()
def _check_input_size(model: torch.nn.Module, size: tuple[int, int], model_size: tuple[int, int],
                      given: bool) -> None:
    """One forward pass on a blank image of ``size``: a size the model cannot take is refused
    now, naming the size it takes, instead of failing on every batch."""
    device = next(model.parameters()).device
    try:
        logits_function(model)(torch.zeros(1, 3, *size, device=device))
    except Exception as error:  # whatever the model raises on that shape
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        h, w = size
        if given:
            raise UsageError(f"--image-size {h} {w}: the model cannot take {h}x{w} images, it takes "
                             f"{model_size[0]}x{model_size[1]}; leave --image-size out or give "
                             f"{model_size[0]} {model_size[1]} (model: {detail})") from None
        raise UnsupportedModelError(f"the model fails on a {h}x{w} image, the size its config names; give "
                                    f"--image-size (model: {detail})") from None


def label_map(spec: str | None, model: torch.nn.Module) -> dict[str, int] | None:
    if spec is None:
        return None
    if spec == "model":
        return {str(k): int(v) for k, v in model.config.label2id.items()}
    return datasets.read_label_map(spec)


def provenance(args: argparse.Namespace) -> dict[str, str]:
    """Where the model and data came from: noted in the summary, not compared on resume."""
    bundled, model = bundled_model(args.model), Path(args.model)
    where = bundled.name if bundled else str(model.resolve()) if model.is_dir() else args.model
    return {"model": where, "data": str(Path(args.data).resolve())}


def fashion_data(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Identity of the Fashion-MNIST canvases (without the folder: the idx files are
    fingerprinted per sample)."""
    identity = fashion.canvas_identity(root=args.data)
    del identity["data_root"]
    return {**identity, **extra}
