"""The paper's positive / negative perturbation test (``pertubation_eval_from_hdf5.py``).

For each image: explain (the predicted class by default), min-max normalise the map
upsampled to the image size, then for 10%, ..., 90% remove the most (positive test) or
least (negative test) relevant pixels by setting them to 0 in [0, 1] image space, normalise,
and check whether the model's top-1 class still equals the true label. The curve starts at
the clean accuracy and is summarised by its AUC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..result import normalize
from .datasets import Labelled
from .images import Normalization, blurred, to_unit_tensor
from .metrics import PERTURBATION_FRACTIONS, perturbation_auc
from .report import plot_perturbation
from .rundir import open_run
from .runner import (Explainer, Explanation, Failure, load_batches, logits_function, model_device,
                     pending_samples, predict, report_non_finite, require_results, write_summary)
from .store import ResultStore


MODES = ("positive", "negative")
RESULTS_FILE = "perturbation.jsonl"
SUMMARY_FILE = "perturbation_summary.json"
PLOT_FILE = "perturbation.png"
OUTPUT_FILES = (RESULTS_FILE, SUMMARY_FILE, PLOT_FILE)


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


def _method_records(explainer: Explainer, logits_fn, method: str, batch: _Batch, needs: list[list[str]],
                    config: PerturbationConfig, chunk: int, failures: list[Failure]) -> list[dict]:
    """Explain the batch rows that still need ``method`` once, then run each pending mode
    (records without the run's stamp, see ``Run.stamp``)."""
    rows = [i for i, modes in enumerate(needs) if modes]
    if not rows:
        return []
    idx = torch.tensor(rows, device=batch.images.device)
    target = batch.labels[idx] if config.target == "true" else None
    res = explainer.explain(config.normalization(batch.images[idx]), method=method, target=target)
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
) -> dict[str, Any]:
    """Run (or resume) the perturbation test and write the summary JSON and plot.

    ``identity`` names what the records depend on besides ``config``, the model's weights and
    the samples' files (e.g. the data kind, the label source, method options); ``provenance``
    what is only noted (paths). Results in ``out_dir`` made by another run are refused
    (``RunIdentityError``) unless ``restart``, which moves them aside (see ``rundir``).
    Returns the summary.
    """
    logits_fn = logits_function(model)
    device = model_device(model)
    failures: list[Failure] = []

    with (open_run(out_dir, "perturbation", model, samples, identity, config, OUTPUT_FILES, restart,
                   provenance) as run,
          ResultStore(run.folder / RESULTS_FILE, ("cfg", "method", "mode", "id")) as store):
        run.check_records(store.records.values())

        def todo(sample: Labelled, method: str) -> list[str]:
            return [m for m in config.modes if (run.cfg, method, m, sample.id) not in store]

        pending = pending_samples(samples, lambda s: not any(todo(s, m) for m in methods))
        for chunk, loaded in load_batches(pending, lambda s: _load(s, config), batch_size, failures,
                                          progress, desc="perturbation"):
            images = torch.stack([image for image, _ in loaded]).to(device)
            if config.replace == "blur":
                replacement = torch.stack([blur for _, blur in loaded]).to(device)
            else:
                replacement = torch.tensor(float(config.replace), device=device).expand_as(images)
            batch = _Batch(chunk, images, replacement, torch.tensor([s.label for s in chunk], device=device),
                           predict(logits_fn, config.normalization(images), forward_batch_size))
            for method in methods:
                needs = [todo(s, method) for s in chunk]
                store.add(run.stamp(_method_records(explainer, logits_fn, method, batch, needs, config,
                                                    forward_batch_size, failures)))
        require_results(samples, failures, (r["id"] for r in store.records.values()))
        summary = summarise_perturbation(store.records, [s.id for s in samples], methods, config, run.cfg)
        write_summary(run.folder / SUMMARY_FILE, summary, run, len(samples), failures)
        plot_perturbation(summary, run.folder / PLOT_FILE)
    return summary


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
