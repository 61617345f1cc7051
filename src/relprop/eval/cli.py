"""``relprop eval perturbation|segmentation|class-specificity``: the paper's vision
benchmarks, and a class-specificity test on two-item canvases, from the shell.

``--format fashion`` runs on relprop's cluttered Fashion-MNIST canvases (test split, canvas
seed 0, the bundled model's benchmark canvases): ``--data`` is then the folder of the
Fashion-MNIST ``*-ubyte.gz`` files and ``--limit N`` takes the first N canvases.

Wire into the top-level parser with ``register(subparsers)``; the ``eval`` parser sets
``run=run``, and ``run(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import datasets, fashion, loading
from .class_specificity import ClassSpecificityConfig, markdown_table, run_class_specificity
from .images import Normalization
from .perturbation import MODES, PerturbationConfig, run_perturbation
from .segmentation import SegmentationConfig, run_segmentation

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("transformer_attribution", "rollout", "raw_attention", "attn_gradcam",
                   "partial_lrp", "lrp", "grad_rollout")


class CliError(Exception):
    pass


def _replace(value: str) -> float | str:
    if value == "blur":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'blur', got {value!r}") from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or Hugging Face Hub id")
    parser.add_argument("--data", required=True, help="dataset path (see --format)")
    parser.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help="explanation methods (default: all seven)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples (sorted order)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per explanation pass (default 8)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="N",
                        help="input H [W] (default: the model config's image_size)")
    parser.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default: the model's processor)")
    parser.add_argument("--std", type=float, nargs=3, help="normalisation std (default: the model's processor)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
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
    pert.add_argument("--forward-batch-size", type=int, default=64,
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


def make_explainer(model: torch.nn.Module, methods: list[str], start_layer: int | None = None) -> Any:
    """``relprop.Explainer`` for the model, after checking the method names."""
    import relprop

    unknown = sorted(set(methods) - set(relprop.methods()))
    if unknown:
        raise CliError(f"unknown methods {unknown}; available: {sorted(relprop.methods())}")
    explainer = relprop.Explainer(model)
    if start_layer is None:
        return explainer
    return fashion.MethodOptions(explainer, {m: {"start_layer": start_layer}
                                             for m in ("transformer_attribution", "rollout")})


def _preprocessing(args: argparse.Namespace, model: torch.nn.Module) -> tuple[tuple[int, int], Normalization]:
    preprocessor = loading.read_preprocessor_config(args.model)
    if args.image_size:
        if len(args.image_size) > 2:
            raise CliError("--image-size takes H or H W")
        size = (args.image_size[0], args.image_size[-1])
    else:
        size = loading.image_size(model, preprocessor)
    norm = loading.normalization(preprocessor)
    norm = Normalization(tuple(args.mean) if args.mean else norm.mean, tuple(args.std) if args.std else norm.std)
    return size, norm


def _label_map(spec: str | None, model: torch.nn.Module) -> dict[str, int] | None:
    if spec is None:
        return None
    if spec == "model":
        return {str(k): int(v) for k, v in model.config.label2id.items()}
    return datasets.read_label_map(spec)


def _identity(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model)
    identity = {"model": str(model.resolve()) if model.is_dir() else args.model,
                "data": str(Path(args.data).resolve())}
    if getattr(args, "start_layer", None) is not None:
        identity["start_layer"] = args.start_layer
    return identity


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; prints a results table, returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prepare = {"perturbation": _prepare_perturbation, "segmentation": _prepare_segmentation,
               "class-specificity": _prepare_class_specificity}[args.eval_command]
    try:  # setup problems (paths, offline model, labels) are user errors: one clear line
        model = loading.load_model(args.model, device)
        size, norm = _preprocessing(args, model)
        explainer = make_explainer(model, args.methods, args.start_layer)
        job = prepare(args, model, size, norm)
    except (CliError, loading.ModelLoadError, OSError, ValueError) as error:
        print(f"relprop eval: error: {error}", file=sys.stderr)
        return 2
    summary = job(explainer)
    if summary["failed"]:
        print(f"{len(summary['failed'])} unreadable samples skipped (listed in the summary)")
    print(f"results in {args.out}")
    return 0


def _fashion_identity(args: argparse.Namespace) -> dict[str, Any]:
    return {**_identity(args), **fashion.canvas_identity(root=args.data)}


def _prepare_perturbation(args, model, size, norm) -> Callable[[Any], dict[str, Any]]:
    if args.format == "fashion":
        if args.labels is not None:
            raise CliError("--labels does not apply to --format fashion (labels are the Fashion-MNIST classes)")
        label_map, samples = None, fashion.canvas_images(args.limit, root=args.data)
    else:
        label_map = _label_map(args.labels, model)
        samples = datasets.image_folder(args.data, label_map)[: args.limit]
    if label_map is None and args.format != "fashion":
        n_classes = len({s.label for s in samples})
        if n_classes != model.config.num_labels:
            log.warning("%d class folders but the model has %d classes: indices from sorted folder names "
                        "are likely wrong; pass --labels", n_classes, model.config.num_labels)
    config = PerturbationConfig(
        image_size=size, normalization=norm, modes=MODES if args.mode == "both" else (args.mode,),
        target=args.target, rank=args.rank, replace=args.replace,
        patch_size=loading.patch_size(model) if args.rank == "patch" else None)
    identity = ({**_fashion_identity(args), "labels": "fashion-mnist"} if args.format == "fashion"
                else {**_identity(args), "labels": args.labels or "sorted-folders"})

    def job(explainer: Any) -> dict[str, Any]:
        summary = run_perturbation(model, explainer, samples, args.methods, args.out, config, identity,
                                   args.batch_size, args.forward_batch_size, not args.no_progress)
        print(f"{'method':<26}" + "".join(f"{mode + ' AUC':>16}" for mode in config.modes))
        for method, entries in summary["results"].items():
            cells = [entries[mode]["auc"] for mode in config.modes]
            print(f"{method:<26}" + "".join(f"{'-' if c is None else f'{c:.2f}':>16}" for c in cells))
        return summary

    return job


def _prepare_segmentation(args, model, size, norm) -> Callable[[Any], dict[str, Any]]:
    fmt = args.format or ("masks" if Path(args.data).is_dir() else "mat")
    if fmt == "fashion":
        samples, identity = fashion.canvas_segmentation(args.limit, root=args.data), _fashion_identity(args)
    else:
        samples = datasets.mask_folder(args.data) if fmt == "masks" else datasets.mat_segmentation(args.data)
        samples, identity = samples[: args.limit], _identity(args)
    config = SegmentationConfig(size, norm)

    def job(explainer: Any) -> dict[str, Any]:
        summary = run_segmentation(model, explainer, samples, args.methods, args.out, config, identity,
                                   args.batch_size, not args.no_progress)
        print(f"{'method':<26}{'pixel acc %':>14}{'mIoU %':>10}{'mAP %':>10}")
        for method, r in summary["results"].items():
            cells = [r["pixel_accuracy"], r["mIoU"], r["mAP"]]
            print(f"{method:<26}" + "".join(f"{'-' if c is None else f'{100 * c:.2f}':>{w}}"
                                           for c, w in zip(cells, (14, 10, 10))))
        return summary

    return job


def _prepare_class_specificity(args, model, size, norm) -> Callable[[Any], dict[str, Any]]:
    samples = fashion.pair_samples(args.limit, root=args.data)
    config = ClassSpecificityConfig(size, norm)
    identity = {**_fashion_identity(args), "data": "fashion_pairs"}

    def job(explainer: Any) -> dict[str, Any]:
        summary = run_class_specificity(model, explainer, samples, args.methods, args.out, config, identity,
                                        args.batch_size, not args.no_progress)
        print(markdown_table(summary))
        return summary

    return job
