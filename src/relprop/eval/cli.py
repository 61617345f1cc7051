"""``relprop eval perturbation|segmentation|class-specificity``: the paper's vision
benchmarks, and a class-specificity test on two-item canvases, from the shell.

``--format fashion`` runs on relprop's cluttered Fashion-MNIST canvases (test split, canvas
seed 0, the bundled model's benchmark canvases): ``--data`` is then the folder of the
Fashion-MNIST ``*-ubyte.gz`` files and ``--limit N`` takes the first N canvases.

A rerun into the same ``--out`` resumes; results made with other model weights, data or
settings are refused (``--restart`` moves them aside), and a folder in use by another run is
refused (see ``rundir``). Wire into the top-level parser with ``register(subparsers)``; the
``eval`` parser sets ``run=run``, and ``run(args)`` returns the exit status or raises a
``RelpropError`` (``relprop.cli.main`` prints it as one line).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..cli import positive_int
from ..errors import Interrupted, UnknownMethodError, UnsupportedModelError, UsageError, did_you_mean
from ..files import output_dir
from . import datasets, fashion, loading
from .class_specificity import ClassSpecificityConfig, markdown_table, run_class_specificity
from .images import Normalization
from .perturbation import MODES, PerturbationConfig, run_perturbation
from .runner import logits_function
from .segmentation import SegmentationConfig, run_segmentation

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("transformer_attribution", "rollout", "raw_attention", "attn_gradcam",
                   "partial_lrp", "lrp", "grad_rollout", "attnlrp", "cp_lrp")


def _replace(value: str) -> float | str:
    if value == "blur":
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 <= number <= 1):  # NaN/inf pixels are no "removal" the model can see
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (image space) or 'blur', got {value!r}")
    return number


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or Hugging Face Hub id")
    parser.add_argument("--data", required=True, help="dataset path (see --format)")
    parser.add_argument("--out", required=True,
                        help="output folder; rerunning the same command into it resumes (it refuses results of "
                             "other model weights, data or settings: see --restart)")
    parser.add_argument("--restart", action="store_true",
                        help="start over: move this benchmark's earlier results in --out into "
                             "--out/previous-<time>/ instead of resuming")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help="explanation methods (default: all nine)")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate only the first N samples (sorted order)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="images per explanation pass (default 8)")
    parser.add_argument("--image-size", type=positive_int, nargs="+", metavar="N",
                        help="input H [W] (default: the model config's image_size)")
    parser.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default: the model's processor)")
    parser.add_argument("--std", type=float, nargs=3, help="normalisation std (default: the model's processor)")
    parser.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--start-layer", type=int,
                        help="start_layer of transformer_attribution and rollout (default: relprop's, 0 for "
                             "vision; the authors' ViT benchmark scripts used 1)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with its ``perturbation``, ``segmentation`` and ``class-specificity``
    subcommands."""
    parser = subparsers.add_parser(
        "eval", help="run the paper's perturbation and segmentation benchmarks",
        description="Benchmarks of Chefer et al. (CVPR 2021), defined as in the authors' scripts.")
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{perturbation,segmentation,class-specificity}")

    pert = sub.add_parser("perturbation", help="positive/negative perturbation test (AUC of top-1 accuracy)",
                          description="Remove 10%..90% of the most (positive) or least (negative) relevant "
                                      "pixels and record top-1 accuracy against the true label.")
    _add_common(pert)
    pert.add_argument("--format", choices=["imagefolder", "fashion"], default="imagefolder",
                      help="imagefolder: DATA/<class_dir>/<image> (ImageNet layout); fashion: cluttered "
                           "Fashion-MNIST test canvases, DATA = the Fashion-MNIST folder")
    pert.add_argument("--labels", help="class index of each folder: a .json {folder: index}, a .txt with one "
                                       "folder name per line (index = line), or 'model' for the model's "
                                       "label2id (default: position among the sorted folder names)")
    pert.add_argument("--mode", choices=[*MODES, "both"], default="both",
                      help="remove the most (positive) or least (negative) relevant pixels first (default both)")
    pert.add_argument("--target", choices=["predicted", "true"], default="predicted",
                      help="class to explain (default: predicted, as the paper)")
    pert.add_argument("--rank", choices=["pixel", "patch"], default="pixel",
                      help="rank pixels of the upsampled map (paper) or whole patches")
    pert.add_argument("--replace", type=_replace, default=0.0,
                      help="value of removed pixels in [0, 1] image space (default 0, the paper), or 'blur'")
    pert.add_argument("--forward-batch-size", type=positive_int, default=64, metavar="N",
                      help="perturbed images per forward pass (default 64)")

    seg = sub.add_parser("segmentation", help="ImageNet-segmentation test (pixel accuracy, mIoU, mAP)",
                         description="Threshold each map at its mean and compare with the object mask.")
    _add_common(seg)
    seg.add_argument("--format", choices=["mat", "masks", "fashion"],
                     help="mat: gtsegs_ijcv.mat; masks: DATA/images/NAME.ext + DATA/masks/NAME.png, "
                          "mask > 0 = foreground; fashion: Fashion-MNIST test canvases with the item "
                          "mask, DATA = the Fashion-MNIST folder (default: mat for a file, masks for a folder)")

    spec = sub.add_parser("class-specificity", help="two-item canvases: is each class's map on its own item?",
                          description="Explain both classes of two-item Fashion-MNIST canvases; report the "
                                      "share of positive relevance on the explained item, how often it gets "
                                      "more than the other item, and the class sensitivity of the maps.")
    _add_common(spec)
    spec.add_argument("--format", choices=["fashion"], default="fashion",
                      help="fashion: pair canvases of the Fashion-MNIST test split, DATA = the Fashion-MNIST folder")
    parser.set_defaults(run=run)
    return parser


def check_methods(methods: list[str]) -> None:
    """``UnknownMethodError`` for a method name relprop does not have."""
    import relprop

    for method in methods:
        if method not in relprop.methods():
            raise UnknownMethodError(f"unknown method {method!r} in --methods; available: "
                                     f"{', '.join(sorted(relprop.methods()))}.{did_you_mean(method, relprop.methods())}")


def make_explainer(model: torch.nn.Module, methods: list[str], start_layer: int | None = None) -> Any:
    """``relprop.Explainer`` for the model, after checking the method names."""
    import relprop

    check_methods(methods)
    explainer = relprop.Explainer(model)
    if start_layer is None:
        return explainer
    return fashion.MethodOptions(explainer, {m: {"start_layer": start_layer}
                                             for m in ("transformer_attribution", "rollout")})


def _device(spec: str | None) -> torch.device:
    """The ``--device`` to run on, checked before any work: a name torch does not know, or a
    device this machine or torch build lacks, is a usage error."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    try:
        torch.empty(1, device=device)
    except (AssertionError, RuntimeError) as error:  # torch says "not compiled with CUDA", "invalid device ordinal"
        raise UsageError(f"--device {spec} is not available here ({str(error).strip().splitlines()[0]}); "
                         "use --device cpu, or leave --device out") from None
    return device


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


def _label_map(spec: str | None, model: torch.nn.Module) -> dict[str, int] | None:
    if spec is None:
        return None
    if spec == "model":
        return {str(k): int(v) for k, v in model.config.label2id.items()}
    return datasets.read_label_map(spec)


def _identity(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Settings beyond the benchmark's config that change results. Paths are left out (see
    ``_provenance``): the model's weights and the samples' files are fingerprinted instead."""
    identity = dict(data)
    if args.start_layer is not None:
        identity["start_layer"] = args.start_layer
    return identity


def _provenance(args: argparse.Namespace) -> dict[str, str]:
    """Where the model and data came from: noted in the summary, not compared on resume."""
    model = Path(args.model)
    return {"model": str(model.resolve()) if model.is_dir() else args.model, "data": str(Path(args.data).resolve())}


def _fashion_data(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    identity = fashion.canvas_identity(root=args.data)
    del identity["data_root"]  # a path; the idx files are fingerprinted per sample
    return {**identity, **extra}


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; prints a results table, returns the exit status. Problems
    are raised as ``RelpropError``s; Ctrl-C as ``Interrupted`` (finished results are kept)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; rerun the same command to resume (finished results are kept in "
                          f"{args.out})") from None


def _run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    output_dir(args.out)
    args.methods = list(dict.fromkeys(args.methods))  # a method named twice is run once
    prepare = {"perturbation": _prepare_perturbation, "segmentation": _prepare_segmentation,
               "class-specificity": _prepare_class_specificity}[args.eval_command]
    model = loading.load_model(args.model, device)
    size, norm = _preprocessing(args, model)
    explainer = make_explainer(model, args.methods, args.start_layer)
    job = prepare(args, model, size, norm)
    summary = job(explainer)
    skipped = {f["id"] for f in summary["failed"]}
    if skipped:
        print(f"{len(skipped)} of {summary['samples']} samples skipped (unreadable, invalid or with non-finite "
              "maps; listed under 'failed' in the summary)")
    print(f"results in {args.out}")
    return 0


def _prepare_perturbation(args, model, size, norm) -> Callable[[Any], dict[str, Any]]:
    if args.format == "fashion":
        if args.labels is not None:
            raise UsageError("--labels does not apply to --format fashion (labels are the Fashion-MNIST classes)")
        label_map = None
        samples: Sequence[datasets.Labelled] = fashion.canvas_images(root=args.data)[: args.limit]
        identity = _identity(args, _fashion_data(args, labels="fashion-mnist"))
    else:
        label_map = _label_map(args.labels, model)
        samples = datasets.image_folder(args.data, label_map)[: args.limit]
        labels = "sorted-folders" if args.labels is None else "model" if args.labels == "model" else "file"
        identity = _identity(args, {"data": "imagefolder", "labels": labels})
    if label_map is None and args.format != "fashion":
        n_classes = len({s.label for s in samples})
        if n_classes != model.config.num_labels:
            log.warning("%d class folders but the model has %d classes: indices from sorted folder names "
                        "are likely wrong; pass --labels", n_classes, model.config.num_labels)
    config = PerturbationConfig(
        image_size=size, normalization=norm, modes=MODES if args.mode == "both" else (args.mode,),
        target=args.target, rank=args.rank, replace=args.replace,
        patch_size=loading.patch_size(model) if args.rank == "patch" else None)

    def job(explainer: Any) -> dict[str, Any]:
        summary = run_perturbation(model, explainer, samples, args.methods, args.out, config, identity,
                                   args.batch_size, args.forward_batch_size, not args.no_progress,
                                   args.restart, _provenance(args))
        print(f"{'method':<26}" + "".join(f"{mode + ' AUC':>16}" for mode in config.modes))
        for method, entries in summary["results"].items():
            cells = [entries[mode]["auc"] for mode in config.modes]
            print(f"{method:<26}" + "".join(f"{'-' if c is None else f'{c:.2f}':>16}" for c in cells))
        return summary

    return job


def _prepare_segmentation(args, model, size, norm) -> Callable[[Any], dict[str, Any]]:
    fmt = args.format or ("masks" if Path(args.data).is_dir() else "mat")
    if fmt == "fashion":
        samples, identity = fashion.canvas_segmentation(root=args.data), _identity(args, _fashion_data(args))
    else:
        samples = datasets.mask_folder(args.data) if fmt == "masks" else datasets.mat_segmentation(args.data)
        identity = _identity(args, {"data": fmt})
    samples = samples[: args.limit]
    config = SegmentationConfig(size, norm)

    def job(explainer: Any) -> dict[str, Any]:
        summary = run_segmentation(model, explainer, samples, args.methods, args.out, config, identity,
                                   args.batch_size, not args.no_progress, args.restart, _provenance(args))
        print(f"{'method':<26}{'pixel acc %':>14}{'mIoU %':>10}{'mAP %':>10}")
        for method, r in summary["results"].items():
            cells = [r["pixel_accuracy"], r["mIoU"], r["mAP"]]
            print(f"{method:<26}" + "".join(f"{'-' if c is None else f'{100 * c:.2f}':>{w}}"
                                           for c, w in zip(cells, (14, 10, 10))))
        return summary

    return job


def _prepare_class_specificity(args, model, size, norm) -> Callable[[Any], dict[str, Any]]:
    samples = fashion.pair_samples(root=args.data)[: args.limit]
    config = ClassSpecificityConfig(size, norm)
    identity = _identity(args, _fashion_data(args, data="fashion_pairs"))

    def job(explainer: Any) -> dict[str, Any]:
        summary = run_class_specificity(model, explainer, samples, args.methods, args.out, config, identity,
                                        args.batch_size, not args.no_progress, args.restart, _provenance(args))
        print(markdown_table(summary))
        return summary

    return job
