"""Metrics of the paper's two vision benchmarks, defined as in the authors' scripts.

Segmentation (``imagenet_seg_eval.py`` + ``utils/metrices.py``): pixel accuracy and IoU
come from counts summed over the whole dataset, with ``np.spacing(1)`` added to the
denominators; mIoU averages the background and foreground IoU; mAP is the mean of a
per-image average precision. Perturbation (``pertubation_eval_from_hdf5.py``): top-1
accuracy after removing 10%, ..., 90% of the pixels, summarised by the area under the
accuracy curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Removed fractions of the perturbation test, written as the authors' literals: the number
# of removed pixels is int(n * fraction), so 0.30000000000000004 (from arange) could differ.
PERTURBATION_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# x-axis of the AUC: the clean image (nothing removed) followed by the removal steps.
AUC_FRACTIONS: tuple[float, ...] = (0.0, *PERTURBATION_FRACTIONS)

_EPS = float(np.spacing(1, dtype=np.float64))


def pixel_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(correct, labelled) pixels of a binary prediction against a binary mask.

    The benchmark's masks have no ignore label, so every pixel is labelled.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return int(np.sum(pred == gt)), int(gt.size)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel intersection and union, ordered [background, foreground]."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = np.array([np.sum(~pred & ~gt), np.sum(pred & gt)], dtype=np.int64)
    union = np.array([np.sum(~pred | ~gt), np.sum(pred | gt)], dtype=np.int64)
    return inter, union


def pixel_accuracy(correct: int, labelled: int) -> float:
    """Fraction of correctly labelled pixels from dataset-wide counts."""
    return float(correct / (_EPS + labelled))


def iou_per_class(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU per class from dataset-wide summed intersections and unions."""
    return np.asarray(inter, np.float64) / (_EPS + np.asarray(union, np.float64))


def mean_iou(inter: np.ndarray, union: np.ndarray) -> float:
    """Mean of the per-class IoU (background and foreground weigh the same)."""
    return float(iou_per_class(inter, union).mean())


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn's ``average_precision_score`` defines it.

    AP = sum_k (R_k - R_{k-1}) * P_k over the distinct score values taken as thresholds
    in decreasing order, so tied scores enter the ranking together. Returns 0.0 when there
    is no positive (scikit-learn's value; the authors' ``nan_to_num`` gives the same).
    """
    y = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in size")
    n_pos = int(y.sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def segmentation_ap(bg_scores: np.ndarray, fg_scores: np.ndarray, gt: np.ndarray) -> float:
    """Per-image AP as the authors' ``get_ap_scores`` computes it on their two-channel output.

    Both channels are flattened into one ranking: every pixel contributes its background
    score (positive when the pixel is background) and its foreground score (positive when
    it is foreground).
    """
    gt = np.asarray(gt, bool).ravel()
    scores = np.concatenate([np.ravel(bg_scores), np.ravel(fg_scores)])
    return average_precision(np.concatenate([~gt, gt]), scores)


def perturbation_auc(accuracy: Sequence[float], fractions: Sequence[float] = AUC_FRACTIONS) -> float:
    """Area under accuracy-vs-removed-fraction by the trapezoid rule, times 100.

    ``accuracy`` starts with the clean accuracy (fraction 0) and holds values in [0, 1];
    the result is on the paper's scale (at most 90 over fractions 0..0.9).
    """
    y = np.asarray(accuracy, np.float64)
    x = np.asarray(fractions, np.float64)
    if y.shape != x.shape:
        raise ValueError(f"{y.size} accuracies for {x.size} fractions")
    return float(100.0 * np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
