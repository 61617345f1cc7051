"""Weak localisation from a relevance map: map -> mask -> bounding box, and the metrics that
score them against ground truth (CorLoc, pointing game, mask IoU).

Thresholds (``threshold_mask``; spelled as on the command line):

* ``"mean"`` — the paper's segmentation rule (``imagenet_seg_eval.py``): min-max normalise the
  map, foreground = above its mean. ``relprop.eval.segmentation`` uses this same function.
* ``"otsu"`` — Otsu's threshold on the min-max normalised map (256 bins): the cut that
  maximises the between-class variance of the two sides; foreground = above it.
* ``"mass:P"`` — the smallest set of pixels holding P% of the map's positive relevance
  (negatives clipped to 0): pixels taken from the most relevant down until their sum reaches
  P% of the total. Equal values are taken in row-major order, so the set has exactly the
  fewest pixels that reach P%.

A constant map, or one without positive relevance for ``mass``, gives an empty mask: it
localises nothing.

Boxes are ``(x0, y0, x1, y1)`` in pixels, half-open (``x1``, ``y1`` one past the last column
and row), so a box's area is ``(x1 - x0) * (y1 - y0)``. ``mask_box`` boxes the mask's
**largest 8-connected component** by default (as weakly supervised localisation usually does,
e.g. CAM, Zhou et al. CVPR 2016: scattered specks of relevance do not stretch the box), or
with ``region="tight"`` all of the mask. A ground-truth box is the tight box of the object
mask (``mask_box(gt, "tight")``).

Metrics (one image each; averages over a dataset are the benchmark's business):

* ``corloc_hit``: the predicted box overlaps the ground-truth box with IoU >= 0.5 (CorLoc,
  Deselaers et al. 2012); no box (empty mask) is a miss.
* ``pointing_hit``: the map's maximum lies on the object mask (pointing game, Zhang et al.
  2016, without tolerance margin); with several maxima the first in row-major order is the
  point, and a constant map has no point: a miss.
* ``mask_iou``: |pred & gt| / |pred | gt| of the two pixel masks (1 when both are empty).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .errors import OptionError
from .result import normalize

ArrayLike = Union[np.ndarray, torch.Tensor]
Box = tuple[int, int, int, int]          # (x0, y0, x1, y1), half-open
THRESHOLDS = ("mean", "otsu", "mass:P")
REGIONS = ("largest", "tight")
CORLOC_IOU = 0.5
OTSU_BINS = 256


def _map(relevance_map: ArrayLike) -> torch.Tensor:
    """[H, W] float32 CPU tensor of a map (torch or numpy); float32 as the segmentation test uses."""
    m = torch.as_tensor(relevance_map).detach().float().cpu()
    if m.dim() != 2:
        raise OptionError(f"a relevance map must be [H, W], got shape {tuple(m.shape)}")
    return m


def _flat(m: torch.Tensor) -> bool:
    return bool(m.max() <= m.min())


def unit_map(relevance_map: ArrayLike) -> torch.Tensor:
    """The map min-max normalised to [0, 1] (a constant map: all zeros), float32 [H, W]."""
    return normalize(_map(relevance_map)[None])[0]


def parse_threshold(spec: str) -> tuple[str, Optional[float]]:
    """``"mean"``, ``"otsu"`` or ``"mass:P"`` (0 < P <= 100) -> (rule, P as a fraction or None);
    anything else is an ``OptionError`` naming the choices."""
    rule, _, value = str(spec).partition(":")
    if rule in ("mean", "otsu") and not value:
        return rule, None
    if rule == "mass":
        try:
            percent = float(value)
        except ValueError:
            percent = float("nan")
        if 0 < percent <= 100:
            return rule, percent / 100
    raise OptionError(f"unknown threshold {spec!r}: use mean, otsu or mass:P with P a percentage in (0, 100] "
                      "(e.g. mass:50)")


def mean_mask(relevance_map: ArrayLike) -> np.ndarray:
    """The paper's segmentation rule: min-max normalise, foreground = above the mean."""
    m = _map(relevance_map)
    if _flat(m):
        return np.zeros(tuple(m.shape), dtype=bool)
    r = unit_map(m)
    return (r > r.mean()).numpy()


def otsu_level(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of values in [0, 1]: the bin edge that maximises the between-class
    variance w0 w1 (mu0 - mu1)^2 of a ``bins``-bin histogram (the first such edge on ties)."""
    hist, edges = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)[:-1].astype(np.float64)           # below each inner edge
    total = float(hist.sum())
    weight1 = total - weight0
    mass0 = np.cumsum(hist * centres)[:-1]
    mass1 = float((hist * centres).sum()) - mass0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = weight0 * weight1 * (mass0 / weight0 - mass1 / weight1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[1:-1][int(np.argmax(between))])


def otsu_mask(relevance_map: ArrayLike) -> np.ndarray:
    """Foreground = normalised map above Otsu's threshold (see `otsu_level`)."""
    m = _map(relevance_map)
    if _flat(m):
        return np.zeros(tuple(m.shape), dtype=bool)
    r = unit_map(m).numpy()
    return r > otsu_level(r)


def mass_mask(relevance_map: ArrayLike, fraction: float) -> np.ndarray:
    """The fewest pixels whose positive relevance adds up to ``fraction`` of the map's total
    positive relevance (most relevant first; equal values in row-major order)."""
    if not 0 < fraction <= 1:
        raise OptionError(f"mass fraction must be in (0, 1], got {fraction}")
    m = _map(relevance_map).double().clamp(min=0).numpy()
    flat = m.ravel()
    total = flat.sum()
    mask = np.zeros(flat.shape, dtype=bool)
    if total > 0:
        order = np.argsort(-flat, kind="stable")
        reached = np.cumsum(flat[order]) >= fraction * total * (1 - 1e-12)   # float sums: P = 100 reaches
        mask[order[: int(np.argmax(reached)) + 1]] = True
    return mask.reshape(m.shape)


def threshold_mask(relevance_map: ArrayLike, threshold: str = "mean") -> np.ndarray:
    """Bool [H, W] foreground of a map under ``threshold`` (``mean``, ``otsu``, ``mass:P``)."""
    rule, fraction = parse_threshold(threshold)
    if rule == "mean":
        return mean_mask(relevance_map)
    if rule == "otsu":
        return otsu_mask(relevance_map)
    assert fraction is not None
    return mass_mask(relevance_map, fraction)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (the first found in row-major order
    on ties); an empty mask stays empty."""
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros(mask.shape, dtype=bool)


def mask_box(mask: ArrayLike, region: str = "largest") -> Optional[Box]:
    """Bounding box (x0, y0, x1, y1), half-open, of the mask's largest 8-connected component
    (``region="largest"``) or of all its pixels (``"tight"``); None for an empty mask."""
    if region not in REGIONS:
        raise OptionError(f"unknown box region {region!r}: use {' or '.join(REGIONS)}")
    m = np.asarray(torch.as_tensor(mask).cpu().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if region == "largest":
        m = largest_component(m)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_area(box: Box) -> int:
    x0, y0, x1, y1 = box
    return max(0, x1 - x0) * max(0, y1 - y0)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two half-open boxes (0 when both are empty)."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def corloc_hit(predicted: Optional[Box], truth: Box, iou: float = CORLOC_IOU) -> bool:
    """CorLoc for one image: the predicted box has IoU >= ``iou`` with the true box."""
    return predicted is not None and box_iou(predicted, truth) >= iou


def pointing_point(relevance_map: ArrayLike) -> Optional[tuple[int, int]]:
    """(x, y) of the map's maximum (the first in row-major order), None for a constant map."""
    m = _map(relevance_map)
    if _flat(m):
        return None
    y, x = divmod(int(torch.argmax(m)), m.shape[1])
    return x, y


def pointing_hit(relevance_map: ArrayLike, truth_mask: ArrayLike) -> bool:
    """Pointing game for one image: the map's maximum lies on the object mask."""
    point = pointing_point(relevance_map)
    truth = np.asarray(torch.as_tensor(truth_mask).cpu().numpy(), dtype=bool)
    return point is not None and bool(truth[point[1], point[0]])


def mask_iou(predicted: ArrayLike, truth: ArrayLike) -> float:
    """|pred & truth| / |pred | truth| of two bool masks (1.0 when both are empty)."""
    p = np.asarray(torch.as_tensor(predicted).cpu().numpy(), dtype=bool)
    t = np.asarray(torch.as_tensor(truth).cpu().numpy(), dtype=bool)
    union = int(np.sum(p | t))
    return float(np.sum(p & t)) / union if union else 1.0


@dataclass
class Localization:
    """A map's mask and box under one threshold (``localize``)."""

    threshold: str
    mask: np.ndarray               # bool [H, W]
    box: Optional[Box]             # of the largest component (or tight), None when the mask is empty
    region: str = "largest"

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "region": self.region, "box": list(self.box) if self.box else None,
                "box_format": "x0, y0, x1, y1 in pixels (x1, y1 exclusive)",
                "mask_pixels": int(self.mask.sum()), "mask_fraction": float(self.mask.mean())}


def localize(relevance_map: ArrayLike, threshold: str = "mean", region: str = "largest") -> Localization:
    """Mask and box of one [H, W] map (at the image's size: use ``Explanation.upsampled()``)."""
    mask = threshold_mask(relevance_map, threshold)
    return Localization(threshold, mask, mask_box(mask, region), region)


def score_localization(relevance_map: ArrayLike, truth_mask: ArrayLike, thresholds=("mean",),
                       region: str = "largest") -> dict:
    """Per threshold: CorLoc hit, mask IoU and the box IoU; plus the pointing-game hit (which
    needs no threshold). The ground-truth box is the tight box of ``truth_mask``."""
    truth = np.asarray(torch.as_tensor(truth_mask).cpu().numpy(), dtype=bool)
    truth_box = mask_box(truth, "tight")
    if truth_box is None:
        raise OptionError("the ground-truth mask is empty: nothing to localise")
    scores: dict = {"pointing": pointing_hit(relevance_map, truth)}
    for threshold in thresholds:
        found = localize(relevance_map, threshold, region)
        scores[threshold] = {"corloc": corloc_hit(found.box, truth_box),
                             "box_iou": box_iou(found.box, truth_box) if found.box else 0.0,
                             "mask_iou": mask_iou(found.mask, truth)}
    return scores
