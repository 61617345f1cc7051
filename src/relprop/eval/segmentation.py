"""The paper's ImageNet-segmentation test (``imagenet_seg_eval.py``).

Per image: explain the predicted class, upsample the map to the image size, min-max
normalise it and threshold it at its mean (above = foreground). Pixel accuracy and the
per-class IoU use counts summed over the dataset; AP is computed per image from the
continuous map and averaged (mAP).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import datasets, fashion
from .args import add_model_data, fashion_data, load_vision, provenance
from .datasets import SegmentationSample
from .images import Normalization, checked_mask, mask_to_tensor, to_unit_tensor
from .metrics import (intersection_union, iou_per_class, mean_iou, pixel_accuracy, pixel_counts,
                      segmentation_ap)
from .runner import (Benchmark, Explain, Explainer, Failure, model_device, register_benchmark, report_non_finite,
                     run_benchmark)


@dataclass(frozen=True)
class SegmentationConfig:
    image_size: tuple[int, int] = (224, 224)
    normalization: Normalization = Normalization()

    def settings(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored


def image_scores(relevance_map: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Counts and AP of one upsampled map [H, W] against its binary mask [H, W]."""
    m = relevance_map.detach().float().cpu()
    lo, hi = m.min(), m.max()
    if hi > lo:
        r = (m - lo) / (hi - lo)
        pred = r > r.mean()
        bg_scores, fg_scores = 1 - r, r
    else:
        # The authors' 0/0 gives NaN, which their script sets to 0: the prediction is all
        # background and both AP channels score 0.
        pred = torch.zeros_like(m, dtype=torch.bool)
        bg_scores = fg_scores = torch.zeros_like(m)
    gt = mask.cpu().numpy()
    pred = pred.numpy()
    correct, labelled = pixel_counts(pred, gt)
    inter, union = intersection_union(pred, gt)
    return {"correct": correct, "labelled": labelled, "inter": inter.tolist(), "union": union.tolist(),
            "ap": segmentation_ap(bg_scores.numpy(), fg_scores.numpy(), gt)}


def _load(sample: SegmentationSample, config: SegmentationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = sample.load()
    return to_unit_tensor(image, config.image_size), mask_to_tensor(checked_mask(mask, image), config.image_size)


@register_benchmark
class SegmentationBenchmark(Benchmark):
    """The ImageNet-segmentation test (one record per method and image: counts and AP)."""

    name = "segmentation"
    help = "ImageNet-segmentation test (pixel accuracy, mIoU, mAP)"
    description = "Threshold each map at its mean and compare with the object mask."

    def __init__(self, model: torch.nn.Module, samples: Sequence[SegmentationSample],
                 config: SegmentationConfig = SegmentationConfig(), identity: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None):
        super().__init__(model, samples, config, identity, provenance)
        self.device = model_device(model)

    def load(self, sample: SegmentationSample) -> tuple[torch.Tensor, torch.Tensor]:
        return _load(sample, self.config)

    def records(self, explain: Explain, method: str, batch: tuple[list, list], needs: list[list[tuple]],
                failures: list[Failure]) -> list[dict]:
        samples, loaded = batch
        rows = [i for i, keys in enumerate(needs) if keys]
        images = torch.stack([loaded[i][0] for i in rows]).to(self.device)
        maps = explain(self.config.normalization(images), target=None).upsampled(size=self.config.image_size)
        records = []
        for j, i in enumerate(rows):
            if not torch.isfinite(maps[j]).all():
                report_non_finite(failures, samples[i].id, method)
                continue
            records.append({"method": method, "id": samples[i].id, **image_scores(maps[j], loaded[i][1])})
        return records

    def summarise(self, records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        return summarise_segmentation(records, ids, methods, cfg)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_data(parser)
        parser.add_argument("--format", choices=["mat", "masks", "fashion"],
                            help="mat: gtsegs_ijcv.mat; masks: DATA/images/NAME.ext + DATA/masks/NAME.png, "
                                 "mask > 0 = foreground; fashion: Fashion-MNIST test canvases with the item "
                                 "mask, DATA = the Fashion-MNIST folder (default: mat for a file, masks for a "
                                 "folder)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> SegmentationBenchmark:
        model, size, norm = load_vision(args, device)
        fmt = args.format or ("masks" if Path(args.data).is_dir() else "mat")
        if fmt == "fashion":
            samples, identity = fashion.canvas_segmentation(root=args.data), fashion_data(args)
        else:
            samples = datasets.mask_folder(args.data) if fmt == "masks" else datasets.mat_segmentation(args.data)
            identity = {"data": fmt}
        return cls(model, samples[: args.limit], SegmentationConfig(size, norm), identity, provenance(args))

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        print(f"{'method':<26}{'pixel acc %':>14}{'mIoU %':>10}{'mAP %':>10}")
        for method, r in summary["results"].items():
            cells = [r["pixel_accuracy"], r["mIoU"], r["mAP"]]
            print(f"{method:<26}" + "".join(f"{'-' if c is None else f'{100 * c:.2f}':>{w}}"
                                           for c, w in zip(cells, (14, 10, 10))))


def run_segmentation(
    model: torch.nn.Module,
    explainer: Explainer,
    samples: Sequence[SegmentationSample],
    methods: Sequence[str],
    out_dir: str | Path,
    config: SegmentationConfig = SegmentationConfig(),
    identity: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    restart: bool = False,
    provenance: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the segmentation test and write the summary JSON; returns it.

    A mask of another size than its image is not resized: that sample fails (listed in the
    summary with both sizes). ``identity``, ``restart``, ``provenance`` and ``options`` as in
    ``run_perturbation``.
    """
    return run_benchmark(SegmentationBenchmark(model, samples, config, identity, provenance), explainer, methods,
                         out_dir, options=options, batch_size=batch_size, progress=progress, restart=restart)


def summarise_segmentation(records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                           cfg: str) -> dict[str, Any]:
    """Per method: n, pixel accuracy, IoU [background, foreground], mIoU and mAP (fractions)."""
    results: dict[str, Any] = {}
    for method in methods:
        found = [records[key] for key in ((cfg, method, i) for i in ids) if key in records]
        entry: dict[str, Any] = {"n": len(found), "pixel_accuracy": None, "iou": None, "mIoU": None, "mAP": None}
        if found:
            inter = np.sum([r["inter"] for r in found], axis=0)
            union = np.sum([r["union"] for r in found], axis=0)
            entry.update(
                pixel_accuracy=pixel_accuracy(sum(r["correct"] for r in found), sum(r["labelled"] for r in found)),
                iou=iou_per_class(inter, union).tolist(),
                mIoU=mean_iou(inter, union),
                mAP=float(np.mean([r["ap"] for r in found])),
            )
        results[method] = entry
    return {"benchmark": "segmentation", "results": results}
