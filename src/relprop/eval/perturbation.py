"""The paper's positive / negative perturbation test (``pertubation_eval_from_hdf5.py``).

For each image: explain (the predicted class by default), min-max normalise the map
upsampled to the image size, then for 10%, ..., 90% remove the most (positive test) or
least (negative test) relevant pixels by setting them to 0 in [0, 1] image space, normalise,
and check whether the model's top-1 class still equals the true label. The curve starts at
the clean accuracy and is summarised by its AUC.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import positive_int, replacement_value
from ..errors import UsageError
from ..result import normalize
from . import datasets, fashion, loading
from .args import add_model_data, fashion_data, label_map, load_vision, provenance
from .datasets import Labelled
from .images import Normalization, blurred, to_unit_tensor
from .metrics import PERTURBATION_FRACTIONS, perturbation_auc
from .report import plot_perturbation
from .runner import (Benchmark, Explain, Explainer, Explanation, Failure, logits_function, model_device, predict,
                     register_benchmark, report_non_finite, run_benchmark)

log = logging.getLogger(__name__)


MODES = ("positive", "negative")
PLOT_FILE = "perturbation.png"


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of a perturbation run; the defaults are the paper's."""

    image_size: tuple[int, int] = (224, 224)
    normalization: Normalization = Normalization()
    modes: tuple[str, ...] = MODES
    target: str = "predicted"  # explain the predicted class, or "true" for the label
    rank: str = "pixel"  # rank pixels of the upsampled map, or "patch" to remove whole patches
    patch_size: int | None = None  # needed for rank="patch"
    replace: float | str = 0.0  # value in [0, 1] image space, or "blur"
    fractions: tuple[float, ...] = PERTURBATION_FRACTIONS

    def __post_init__(self) -> None:
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.target not in ("predicted", "true"):
            raise ValueError(f"target must be 'predicted' or 'true', got {self.target!r}")
        if self.rank not in ("pixel", "patch"):
            raise ValueError(f"rank must be 'pixel' or 'patch', got {self.rank!r}")
        if self.rank == "patch" and not self.patch_size:
            raise ValueError("rank='patch' needs patch_size")
        if isinstance(self.replace, str):
            if self.replace != "blur":
                raise ValueError(f"replace must be a number in [0, 1] or 'blur', got {self.replace!r}")
        elif not (math.isfinite(self.replace) and 0 <= self.replace <= 1):  # NaN would remove nothing visibly
            raise ValueError(f"replace must be a number in [0, 1] (image space) or 'blur', got {self.replace!r}")

    def settings(self) -> dict[str, Any]:
        """Everything that changes a record's value except the method and mode."""
        settings = json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored
        del settings["modes"]  # each record carries its own mode
        if self.rank == "pixel":
            del settings["patch_size"]
        return settings


def ranking_scores(res: Explanation, config: PerturbationConfig) -> torch.Tensor:
    """[B, h, w] normalised scores to rank: the upsampled map (pixels) or the patch grid."""
    height, width = config.image_size
    if config.rank == "pixel":
        scores = res.upsampled(size=(height, width))
    else:
        p = config.patch_size
        assert p, "rank='patch' needs patch_size (checked by PerturbationConfig)"
        grid = (height // p, width // p)
        relevance = res.relevance.detach()
        if relevance.dim() == 2:  # one score per patch token
            if relevance.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"{relevance.shape[1]} patch scores for a {grid[0]}x{grid[1]} patch grid")
            scores = relevance.reshape(-1, *grid)
        else:  # pixel-level map: a patch scores the mean of its pixels
            scores = F.avg_pool2d(relevance[:, None].float(), p)[:, 0]
    return normalize(scores.detach().float())  # a constant map -> zeros, unlike the authors' 0/0 NaNs


def removal_masks(scores: torch.Tensor, fractions: Sequence[float], negative: bool,
                  image_size: tuple[int, int]) -> torch.Tensor:
    """Bool [B, S, H, W]: pixels removed at each step.

    Like the authors, step f takes ``torch.topk`` of the flattened scores (negated for the
    negative test) with k = int(n * f). A score grid coarser than the image (patches)
    expands each cell to its block of pixels.
    """
    b, h, w = scores.shape
    flat = (-scores if negative else scores).reshape(b, -1)
    masks = torch.zeros(b, len(fractions), h * w, dtype=torch.bool, device=scores.device)
    for step, fraction in enumerate(fractions):
        idx = torch.topk(flat, int(h * w * fraction), dim=-1).indices
        masks[:, step].scatter_(-1, idx, True)
    return expand_cells(masks.reshape(b, len(fractions), h, w), image_size)


def expand_cells(masks: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """[..., h, w] -> [..., H, W]: each cell of a grid coarser than the image (a patch) expanded
    to its block of pixels; a grid of the image's size is returned as it is."""
    h, w = masks.shape[-2:]
    height, width = image_size
    if (h, w) == (height, width):
        return masks
    return masks.repeat_interleave(height // h, dim=-2).repeat_interleave(width // w, dim=-1)


@torch.no_grad()
def perturbed_predictions(logits_fn, images: torch.Tensor, masks: torch.Tensor,
                          replacement: torch.Tensor, normalization: Normalization,
                          chunk: int) -> torch.Tensor:
    """Long [B, S]: top-1 class of every perturbed image, all steps of all images batched
    together and forwarded ``chunk`` at a time."""
    b, s = masks.shape[:2]
    flat_masks = masks.reshape(b * s, 1, *masks.shape[2:])
    owner = torch.arange(b, device=images.device).repeat_interleave(s)
    preds = []
    for start in range(0, b * s, chunk):
        rows = owner[start : start + chunk]
        x = torch.where(flat_masks[start : start + chunk], replacement[rows], images[rows])
        preds.append(logits_fn(normalization(x)).argmax(dim=-1))
    return torch.cat(preds).reshape(b, s)


def _load(sample: Labelled, config: PerturbationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    image = sample.load()
    blur = to_unit_tensor(blurred(image), config.image_size) if config.replace == "blur" else None
    return to_unit_tensor(image, config.image_size), blur


@dataclass
class _Batch:
    """Loaded images of one batch, shared by all methods."""

    samples: list[Labelled]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    replacement: torch.Tensor  # values of removed pixels, broadcast to the images
    labels: torch.Tensor
    clean: torch.Tensor  # top-1 class of the unperturbed images


def _method_records(explain: Explain, logits_fn, method: str, batch: _Batch, needs: list[list[str]],
                    config: PerturbationConfig, chunk: int, failures: list[Failure]) -> list[dict]:
    """Explain the batch rows that still need ``method`` once, then run each pending mode
    (records without the run's stamp, see ``Run.stamp``)."""
    rows = [i for i, modes in enumerate(needs) if modes]
    if not rows:
        return []
    idx = torch.tensor(rows, device=batch.images.device)
    target = batch.labels[idx] if config.target == "true" else None
    res = explain(config.normalization(batch.images[idx]), target=target)
    scores = ranking_scores(res, config).to(batch.images.device)
    explained = res.target.tolist()
    finite = torch.isfinite(scores.flatten(1)).all(dim=1).tolist()
    for j in (j for j, ok in enumerate(finite) if not ok):
        report_non_finite(failures, batch.samples[rows[j]].id, method)
    records = []
    for mode in config.modes:
        sel = [j for j, i in enumerate(rows) if mode in needs[i] and finite[j]]
        if not sel:
            continue
        owners = idx[sel]
        masks = removal_masks(scores[sel], config.fractions, mode == "negative", config.image_size)
        preds = perturbed_predictions(logits_fn, batch.images[owners], masks, batch.replacement[owners],
                                      config.normalization, chunk)
        hits = (preds == batch.labels[owners][:, None]).int().tolist()
        for j, row_hits in zip(sel, hits):
            i = rows[j]
            records.append({
                "method": method, "mode": mode, "id": batch.samples[i].id,
                "label": batch.samples[i].label, "pred": int(batch.clean[i]), "explained": int(explained[j]),
                "clean": int(batch.clean[i] == batch.labels[i]), "hits": row_hits,
            })
    return records


@register_benchmark
class PerturbationBenchmark(Benchmark):
    """The positive / negative perturbation test (records per method, mode and image)."""

    name = "perturbation"
    help = "positive/negative perturbation test (AUC of top-1 accuracy)"
    description = ("Remove 10%..90% of the most (positive) or least (negative) relevant pixels and record "
                   "top-1 accuracy against the true label.")
    key_fields = ("method", "mode", "id")

    def __init__(self, model: torch.nn.Module, samples: Sequence[Labelled],
                 config: PerturbationConfig = PerturbationConfig(), identity: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None, forward_batch_size: int = 64):
        super().__init__(model, samples, config, identity, provenance)
        self.logits_fn = logits_function(model)
        self.device = model_device(model)
        self.forward_batch_size = forward_batch_size

    def keys(self, sample_id: str, method: str) -> list[tuple]:
        return [(method, mode, sample_id) for mode in self.config.modes]

    def load(self, sample: Labelled) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _load(sample, self.config)

    def collate(self, samples: list[Labelled], loaded: list[Any]) -> _Batch:
        images = torch.stack([image for image, _ in loaded]).to(self.device)
        if self.config.replace == "blur":
            replacement = torch.stack([blur for _, blur in loaded]).to(self.device)
        else:
            replacement = torch.tensor(float(self.config.replace), device=self.device).expand_as(images)
        return _Batch(samples, images, replacement, torch.tensor([s.label for s in samples], device=self.device),
                      predict(self.logits_fn, self.config.normalization(images), self.forward_batch_size))

    def records(self, explain: Explain, method: str, batch: _Batch, needs: list[list[tuple]],
                failures: list[Failure]) -> list[dict]:
        modes = [[key[1] for key in keys] for keys in needs]
        return _method_records(explain, self.logits_fn, method, batch, modes, self.config,
                               self.forward_batch_size, failures)

    def summarise(self, records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        return summarise_perturbation(records, ids, methods, self.config, cfg)

    def report_files(self) -> tuple[str, ...]:
        return (PLOT_FILE,)

    def write_reports(self, summary: Mapping[str, Any], folder: Path) -> None:
        plot_perturbation(dict(summary), folder / PLOT_FILE)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_data(parser)
        parser.add_argument("--format", choices=["imagefolder", "fashion"], default="imagefolder",
                            help="imagefolder: DATA/<class_dir>/<image> (ImageNet layout); fashion: cluttered "
                                 "Fashion-MNIST test canvases, DATA = the Fashion-MNIST folder")
        parser.add_argument("--labels", help="class index of each folder: a .json {folder: index}, a .txt with "
                                             "one folder name per line (index = line), or 'model' for the "
                                             "model's label2id (default: position among the sorted folder names)")
        parser.add_argument("--mode", choices=[*MODES, "both"], default="both",
                            help="remove the most (positive) or least (negative) relevant pixels first "
                                 "(default both)")
        parser.add_argument("--target", choices=["predicted", "true"], default="predicted",
                            help="class to explain (default: predicted, as the paper)")
        parser.add_argument("--rank", choices=["pixel", "patch"], default="pixel",
                            help="rank pixels of the upsampled map (paper) or whole patches")
        parser.add_argument("--replace", type=replacement_value, default=0.0,
                            help="value of removed pixels in [0, 1] image space (default 0, the paper), or 'blur'")
        parser.add_argument("--forward-batch-size", type=positive_int, default=64, metavar="N",
                            help="perturbed images per forward pass (default 64)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> PerturbationBenchmark:
        model, size, norm = load_vision(args, device)
        if args.format == "fashion":
            if args.labels is not None:
                raise UsageError("--labels does not apply to --format fashion (labels are the Fashion-MNIST "
                                 "classes)")
            samples: Sequence[Labelled] = fashion.canvas_images(root=args.data)[: args.limit]
            identity = fashion_data(args, labels="fashion-mnist")
        else:
            labels = label_map(args.labels, model)
            samples = datasets.image_folder(args.data, labels)[: args.limit]
            identity = {"data": "imagefolder",
                        "labels": "sorted-folders" if args.labels is None else "model" if args.labels == "model"
                        else "file"}
            if labels is None and len({s.label for s in samples}) != model.config.num_labels:
                log.warning("%d class folders but the model has %d classes: indices from sorted folder names "
                            "are likely wrong; pass --labels", len({s.label for s in samples}),
                            model.config.num_labels)
        config = PerturbationConfig(
            image_size=size, normalization=norm, modes=MODES if args.mode == "both" else (args.mode,),
            target=args.target, rank=args.rank, replace=args.replace,
            patch_size=loading.patch_size(model) if args.rank == "patch" else None)
        return cls(model, samples, config, identity, provenance(args), args.forward_batch_size)

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        modes = self.config.modes
        print(f"{'method':<26}" + "".join(f"{mode + ' AUC':>16}" for mode in modes))
        for method, entries in summary["results"].items():
            cells = [entries[mode]["auc"] for mode in modes]
            print(f"{method:<26}" + "".join(f"{'-' if c is None else f'{c:.2f}':>16}" for c in cells))


def run_perturbation(
    model: torch.nn.Module,
    explainer: Explainer,
    samples: Sequence[Labelled],
    methods: Sequence[str],
    out_dir: str | Path,
    config: PerturbationConfig = PerturbationConfig(),
    identity: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    forward_batch_size: int = 64,
    progress: bool = True,
    restart: bool = False,
    provenance: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the perturbation test and write the summary JSON and plot.

    ``identity`` names what the records depend on besides ``config``, the model's weights and
    the samples' files (e.g. the data kind, the label source); ``provenance`` what is only
    noted (paths); ``options`` per-method options of ``explain``. Results in ``out_dir`` made
    by another run are refused (``RunIdentityError``) unless ``restart``, which moves them
    aside (see ``rundir``). Returns the summary.
    """
    benchmark = PerturbationBenchmark(model, samples, config, identity, provenance, forward_batch_size)
    return run_benchmark(benchmark, explainer, methods, out_dir, options=options, batch_size=batch_size,
                         progress=progress, restart=restart)


def summarise_perturbation(records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                           config: PerturbationConfig, cfg: str) -> dict[str, Any]:
    """Per method and mode: n, accuracy at each fraction (clean first) and AUC."""
    fractions = (0.0, *config.fractions)
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        for mode in config.modes:
            found = [records[key] for key in ((cfg, method, mode, i) for i in ids) if key in records]
            entry: dict[str, Any] = {"n": len(found), "fractions": list(fractions), "accuracy": None, "auc": None}
            if found:
                curve = np.array([[r["clean"], *r["hits"]] for r in found], dtype=np.float64).mean(axis=0)
                entry["accuracy"] = curve.tolist()
                entry["auc"] = perturbation_auc(curve, fractions)
            results.setdefault(method, {})[mode] = entry
    return {"benchmark": "perturbation", "results": results}
