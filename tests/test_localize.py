"""Weak localisation: thresholds, boxes and metrics on hand-made maps; the segmentation test
shares the mean rule; ``relprop localize`` end to end on the bundled Fashion-MNIST model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from relprop.errors import OptionError
from tests.conftest import needs_real_data
from relprop.localize import (box_iou, corloc_hit, largest_component, localize, mask_box, mask_iou, mass_mask,
                              mean_mask, otsu_level, otsu_mask, parse_threshold, pointing_hit, pointing_point,
                              score_localization, threshold_mask)


def blob_map() -> np.ndarray:
    """10x12 map: a strong 3x4 block at rows 2-4, cols 3-6, a weak speck at (8, 10)."""
    m = np.zeros((10, 12), dtype=np.float32)
    m[2:5, 3:7] = 1.0
    m[8, 10] = 0.6
    return m


def test_mean_mask_is_the_segmentation_rule():
    m = torch.rand(17, 23)
    r = (m - m.min()) / (m.max() - m.min())
    assert np.array_equal(mean_mask(m), (r > r.mean()).numpy())
    assert not mean_mask(torch.full((4, 4), 3.0)).any()              # constant map: nothing


def test_segmentation_uses_mean_mask():
    from relprop.eval import segmentation

    m, gt = torch.rand(8, 8), torch.rand(8, 8) > 0.5
    scores = segmentation.image_scores(m, gt)
    pred = mean_mask(m)
    assert scores["correct"] == int((pred == gt.numpy()).sum())
    assert segmentation.mean_mask is mean_mask                        # one place for the rule


def test_otsu_separates_two_levels():
    values = np.r_[np.full(70, 0.1), np.full(30, 0.9)]
    level = otsu_level(values)
    assert 0.1 < level < 0.9
    m = blob_map()
    m[m == 0] = 0.05
    mask = otsu_mask(m)
    assert mask[2:5, 3:7].all() and mask.sum() in (12, 13)          # the block (and maybe the speck)
    assert not otsu_mask(np.ones((3, 3))).any()


def test_mass_mask_is_the_fewest_pixels():
    m = np.array([[4.0, 3.0, -5.0], [2.0, 1.0, 0.0]])                # positive total 10
    assert mass_mask(m, 0.4).tolist() == [[True, False, False], [False, False, False]]
    assert mass_mask(m, 0.5).tolist() == [[True, True, False], [False, False, False]]
    assert mass_mask(m, 1.0).sum() == 4                              # every positive pixel, no negative one
    assert not mass_mask(-np.ones((2, 2)), 0.5).any()                # no positive relevance
    tie = np.ones((2, 2))
    assert mass_mask(tie, 0.5).tolist() == [[True, True], [False, False]]   # ties: row-major order


def test_threshold_names():
    assert parse_threshold("mass:50") == ("mass", 0.5)
    assert parse_threshold("otsu") == ("otsu", None)
    for bad in ("mass:0", "mass:101", "mass:x", "max", "mean:3"):
        with pytest.raises(OptionError, match="threshold"):
            parse_threshold(bad)
    m = blob_map()
    assert threshold_mask(m, "mass:100").sum() == 13


def test_boxes_largest_component_and_tight():
    mask = blob_map() > 0
    assert mask_box(mask) == (3, 2, 7, 5)                             # the block; the speck is ignored
    assert mask_box(mask, "tight") == (3, 2, 11, 9)
    assert mask_box(np.zeros((3, 3), bool)) is None
    diagonal = np.eye(4, dtype=bool)                                  # 8-connected: one component
    assert largest_component(diagonal).sum() == 4
    with pytest.raises(OptionError):
        mask_box(mask, "loose")


def test_box_iou_and_corloc():
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)
    assert box_iou((0, 0, 2, 2), (5, 5, 6, 6)) == 0.0
    assert corloc_hit((0, 0, 4, 4), (0, 0, 4, 8))                      # IoU exactly 0.5 counts
    assert not corloc_hit((0, 0, 4, 4), (0, 0, 4, 9))
    assert not corloc_hit(None, (0, 0, 4, 4))


def test_pointing_game_and_mask_iou():
    m = blob_map()
    truth = np.zeros_like(m, dtype=bool)
    truth[2, 3] = True
    assert pointing_point(m) == (3, 2)                                 # first maximum, row-major
    assert pointing_hit(m, truth)
    assert not pointing_hit(m, ~truth)
    assert not pointing_hit(np.zeros((3, 3)), np.ones((3, 3), bool))   # a constant map points nowhere
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_score_localization_per_threshold():
    m = blob_map()
    truth = np.zeros_like(m, dtype=bool)
    truth[2:5, 3:7] = True
    scores = score_localization(m, truth, ("mean", "mass:20"))
    assert scores["pointing"] is True
    assert scores["mean"] == {"corloc": True, "box_iou": 1.0, "mask_iou": pytest.approx(12 / 13)}
    assert scores["mass:20"]["corloc"] is False and scores["mass:20"]["mask_iou"] == pytest.approx(3 / 12)
    with pytest.raises(OptionError, match="empty"):
        score_localization(m, np.zeros_like(truth), ("mean",))
    found = localize(m, "mean")
    assert found.to_json()["box"] == [3, 2, 7, 5]
    assert json.dumps(found.to_json())


@needs_real_data
def test_localize_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    from relprop.cli import main
    from relprop.demo import FASHION_MODEL
    from relprop.datasets import make_canvas

    image, mask, label = make_canvas("test", 0, 0)
    path = tmp_path / "canvas.png"
    Image.fromarray(image).save(path)
    out = tmp_path / "out"
    assert main(["localize", str(path), "--model", str(FASHION_MODEL), "--out", str(out)]) == 0
    [found] = out.glob("*.json")
    entry = json.loads(found.read_text())
    assert found.name == "canvas_transformer_attribution_class9_Ankle_boot_localize.json"
    assert entry["threshold"] == "mean" and entry["class"] == label
    x0, y0, x1, y1 = entry["box"]
    truth = mask_box(mask, "tight")
    assert box_iou((x0, y0, x1, y1), truth) > 0.3                   # the bundled model finds the item
    png = Image.open(out / entry["png"])
    assert png.size[0] > 2 * 256 and png.size[1] == 256             # two panels, scaled up from 64x64
    assert "canvas.png: Ankle boot" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["localize", str(path), "--model", str(FASHION_MODEL), "--threshold", "mass:0"])
    assert exit_.value.code == 2
    assert "mass:P" in capsys.readouterr().err
