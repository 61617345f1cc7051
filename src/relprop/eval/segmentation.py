"""The paper's ImageNet-segmentation test (``imagenet_seg_eval.py``).

Per image: explain the predicted class, upsample the map to the image size, min-max
normalise it and threshold it at its mean (above = foreground). Pixel accuracy and the
per-class IoU use counts summed over the dataset; AP is computed per image from the
continuous map and averaged (mAP).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..localize import mean_mask, unit_map
from .datasets import SegmentationSample
from .images import Normalization, checked_mask, mask_to_tensor, to_unit_tensor
from .metrics import (intersection_union, iou_per_class, mean_iou, pixel_accuracy, pixel_counts,
                      segmentation_ap)
from .rundir import open_run
from .runner import (Explainer, Failure, load_batches, model_device, pending_samples, report_non_finite,
                     require_results, write_summary)
from .store import ResultStore


RESULTS_FILE = "segmentation.jsonl"
SUMMARY_FILE = "segmentation_summary.json"
OUTPUT_FILES = (RESULTS_FILE, SUMMARY_FILE)


@dataclass(frozen=True)
class SegmentationConfig:
    image_size: tuple[int, int] = (224, 224)
    normalization: Normalization = Normalization()

    def settings(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored


def image_scores(relevance_map: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Counts and AP of one upsampled map [H, W] against its binary mask [H, W]."""
    m = relevance_map.detach().float().cpu()
    pred = mean_mask(m)  # the one mean-threshold rule, shared with `relprop localize`
    if m.max() > m.min():
        r = unit_map(m)
        bg_scores, fg_scores = 1 - r, r
    else:
        # The authors' 0/0 gives NaN, which their script sets to 0: the prediction is all
        # background (mean_mask's empty mask) and both AP channels score 0.
        bg_scores = fg_scores = torch.zeros_like(m)
    gt = mask.cpu().numpy()
    correct, labelled = pixel_counts(pred, gt)
    inter, union = intersection_union(pred, gt)
    return {"correct": correct, "labelled": labelled, "inter": inter.tolist(), "union": union.tolist(),
            "ap": segmentation_ap(bg_scores.numpy(), fg_scores.numpy(), gt)}


def _load(sample: SegmentationSample, config: SegmentationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = sample.load()
    return to_unit_tensor(image, config.image_size), mask_to_tensor(checked_mask(mask, image), config.image_size)


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
) -> dict[str, Any]:
    """Run (or resume) the segmentation test and write the summary JSON; returns it.

    A mask of another size than its image is not resized: that sample fails (listed in the
    summary with both sizes). ``identity``, ``restart`` and ``provenance`` as in
    ``run_perturbation``.
    """
    device = model_device(model)
    failures: list[Failure] = []

    with (open_run(out_dir, "segmentation", model, samples, identity, config, OUTPUT_FILES, restart,
                   provenance) as run,
          ResultStore(run.folder / RESULTS_FILE, ("cfg", "method", "id")) as store):
        run.check_records(store.records.values())
        cfg = run.cfg
        pending = pending_samples(samples, lambda s: all((cfg, m, s.id) in store for m in methods))
        for batch, loaded in load_batches(pending, lambda s: _load(s, config), batch_size, failures,
                                          progress, desc="segmentation"):
            images = torch.stack([image for image, _ in loaded]).to(device)
            for method in methods:
                rows = [i for i, s in enumerate(batch) if (cfg, method, s.id) not in store]
                if not rows:
                    continue
                x = config.normalization(images[torch.tensor(rows, device=device)])
                maps = explainer.explain(x, method=method, target=None).upsampled(size=config.image_size)
                records = []
                for j, i in enumerate(rows):
                    if not torch.isfinite(maps[j]).all():
                        report_non_finite(failures, batch[i].id, method)
                        continue
                    records.append({"method": method, "id": batch[i].id, **image_scores(maps[j], loaded[i][1])})
                store.add(run.stamp(records))
        require_results(samples, failures, (r["id"] for r in store.records.values()))
        summary = summarise_segmentation(store.records, [s.id for s in samples], methods, cfg)
        write_summary(run.folder / SUMMARY_FILE, summary, run, len(samples), failures)
    return summary


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
