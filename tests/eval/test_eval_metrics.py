import numpy as np
import pytest

from relprop.eval.metrics import (AUC_FRACTIONS, average_precision, intersection_union, iou_per_class,
                                  mean_iou, perturbation_auc, pixel_accuracy, pixel_counts, segmentation_ap)


def test_pixel_counts_and_iou_by_hand():
    pred = np.array([[1, 1, 0],
                     [0, 0, 0]], bool)
    gt = np.array([[1, 0, 0],
                   [1, 0, 0]], bool)
    # equal at (0,0) fg, (0,2), (1,1), (1,2) bg -> 4 of 6 correct
    assert pixel_counts(pred, gt) == (4, 6)
    inter, union = intersection_union(pred, gt)
    # background: both bg at (0,2), (1,1), (1,2) = 3; bg in either: all but (0,0) = 5
    # foreground: both fg at (0,0) = 1; fg in either: (0,0), (0,1), (1,0) = 3
    assert inter.tolist() == [3, 1] and union.tolist() == [5, 3]


def test_dataset_level_accuracy_and_miou_sum_counts_first():
    # image 1: inter [3, 1], union [5, 3], correct 4/6 (above)
    # image 2: all-foreground prediction on a 2x2 all-foreground mask: inter [0, 4], union [0, 4]
    inter = np.array([3, 1]) + np.array([0, 4])
    union = np.array([5, 3]) + np.array([0, 4])
    # IoU = summed inter / summed union: bg 3/5 = 0.6, fg 5/7; mIoU = (0.6 + 5/7) / 2 = 0.657142...
    assert iou_per_class(inter, union) == pytest.approx([0.6, 5 / 7])
    assert mean_iou(inter, union) == pytest.approx((0.6 + 5 / 7) / 2)
    # pixel accuracy = (4 + 4) / (6 + 4) = 0.8, not the mean of per-image 2/3 and 1
    assert pixel_accuracy(4 + 4, 6 + 4) == pytest.approx(0.8)
    # a class absent everywhere has 0/(0 + eps) = 0, not NaN, as in the authors' script
    assert iou_per_class(np.array([0, 2]), np.array([0, 2])).tolist() == [0.0, 1.0]


def test_average_precision_by_hand():
    # perfect ranking: precision 1 at every recall step
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    # ranking 1,0,1: thresholds 0.9 -> P=1 R=1/2; 0.5 -> P=1/2 R=1/2; 0.1 -> P=2/3 R=1
    # AP = 1/2*1 + 0*1/2 + 1/2*2/3 = 5/6
    assert average_precision([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(5 / 6)
    # ties enter together: 0.9 -> TP=1 FP=1: P=1/2 R=1/3; 0.5 -> TP=2 FP=2: P=1/2 R=2/3;
    # 0.1 -> TP=3 FP=2: P=3/5 R=1; AP = 1/3*1/2 + 1/3*1/2 + 1/3*3/5 = 0.5333...
    assert average_precision([1, 0, 1, 0, 1], [0.9, 0.9, 0.5, 0.5, 0.1]) == pytest.approx(1.6 / 3)
    # all tied: one threshold, P = 2/4 at R = 1 -> AP = 0.5 (order of the input is irrelevant)
    assert average_precision([0, 1, 1, 0], [0.3] * 4) == pytest.approx(0.5)
    # no positive: 0, as scikit-learn (and the authors' nan_to_num)
    assert average_precision([0, 0], [0.2, 0.1]) == 0.0


def test_average_precision_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 80))
        y = rng.random(n) > 0.6
        y[0] = True
        scores = rng.integers(0, 6, n) / 5  # coarse scores: many ties
        assert average_precision(y, scores) == pytest.approx(sklearn.average_precision_score(y, scores), abs=1e-12)


def test_segmentation_ap_ranks_both_channels_together():
    # pixels fg-score r = [0, 1/4, 3/4, 1], mask [bg, bg, fg, fg]; background score 1 - r.
    # The 8 entries by score: 1 (bg0+, fg3+), 3/4 (bg1+, fg2+), 1/4 (bg2-, fg1-), 0 (bg3-, fg0-):
    # all 4 positives first -> AP = 1
    r = np.array([0, 0.25, 0.75, 1])
    gt = np.array([0, 0, 1, 1], bool)
    assert segmentation_ap(1 - r, r, gt) == pytest.approx(1.0)
    # swapped channels: 1 (bg3-, fg0-), 3/4 (bg2-, fg1-), 1/4 (bg1+, fg2+), 0 (bg0+, fg3+)
    # thresholds 1, 3/4 add no recall; 1/4: P = 2/6, R = 1/2; 0: P = 4/8, R = 1
    # AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12
    assert segmentation_ap(r, 1 - r, gt) == pytest.approx(5 / 12)


def test_perturbation_auc_by_hand():
    # trapezoid, width 0.1: 0.1 * sum of neighbour means
    # (0.8+0.6)/2 + (0.6+0.5)/2 + (0.5+0.4)/2 + (0.4+0.3)/2 + (0.3+0.2)/2 + (0.2+0.2)/2
    # + (0.2+0.1)/2 + (0.1+0.1)/2 + (0.1+0.0)/2 = 2.8 -> 0.28, x100 = 28.0
    acc = [0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0]
    assert perturbation_auc(acc) == pytest.approx(28.0)
    # constant accuracy 1 over [0, 0.9] -> 0.9 x 100 = 90, the maximum
    assert perturbation_auc([1.0] * 10) == pytest.approx(90.0)
    assert AUC_FRACTIONS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    with pytest.raises(ValueError):
        perturbation_auc([1.0] * 9)
