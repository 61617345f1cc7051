"""Class-specificity test: the scores on hand-made maps, the summary, and runs with a fake
and with the real explainer (class-agnostic methods must score exactly 0 and 50%)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop.eval.class_specificity import (ClassSpecificityConfig, markdown_table, pair_scores,
                                            run_class_specificity, summarise_class_specificity)

from eval_fakes import IMAGE_SIZE, PATCH, FakeExplainer, FakeExplanation

SIZE = (IMAGE_SIZE, IMAGE_SIZE)

MASK_A = torch.zeros(4, 4, dtype=torch.bool)
MASK_A[:2, :2] = True
MASK_B = torch.zeros(4, 4, dtype=torch.bool)
MASK_B[2:, 2:] = True


def test_pair_scores_hand_computed():
    map_a = torch.tensor([[4., 2, 0, 0], [2, 0, 0, 0], [0, 0, 1, 1], [-3, 0, 0, 0]])
    map_b = torch.tensor([[1., 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, -1]])
    s = pair_scores(map_a, map_b, MASK_A, MASK_B)
    # A: positive mass 10 (the -3 is clipped), 8 on A's mask, 2 on B's.
    assert s["share_a"] == pytest.approx(0.8) and s["win_a"] == 1.0
    # B: positive mass 3, 2 on B's mask, 1 on A's.
    assert s["share_b"] == pytest.approx(2 / 3) and s["win_b"] == 1.0
    # sum |a - b| = 13; sum |a| + sum |b| = 13 + 4.
    assert s["sensitivity"] == pytest.approx(13 / 17)


def test_swapped_maps_lose_both():
    map_a = torch.zeros(4, 4)
    map_a[3, 3] = 1.0  # class A's map points at item B
    map_b = torch.zeros(4, 4)
    map_b[0, 0] = 3.0  # and class B's at item A
    s = pair_scores(map_a, map_b, MASK_A, MASK_B)
    assert (s["share_a"], s["share_b"], s["win_a"], s["win_b"]) == (0.0, 0.0, 0.0, 0.0)
    assert s["sensitivity"] == 1.0  # disjoint supports


def test_class_agnostic_map_scores_zero_and_one_half():
    m = torch.tensor([[4., 2, 0, 0], [2, 0, 0, 0], [0, 0, 1, 1], [-3, 0, 0, 0]])
    s = pair_scores(m, m.clone(), MASK_A, MASK_B)
    assert s["sensitivity"] == 0.0
    assert s["win_a"] + s["win_b"] == 1.0  # whichever item wins for A loses for B
    assert s["share_a"] == pytest.approx(0.8) and s["share_b"] == pytest.approx(0.2)


def test_map_without_positive_relevance():
    s = pair_scores(-torch.ones(4, 4), torch.zeros(4, 4), MASK_A, MASK_B)
    assert s["share_a"] is None and s["share_b"] is None
    assert s["win_a"] == s["win_b"] == 0.5  # a tie (0 vs 0) counts one half
    assert s["sensitivity"] == 1.0  # 16 / (16 + 0)
    assert pair_scores(torch.zeros(4, 4), torch.zeros(4, 4), MASK_A, MASK_B)["sensitivity"] == 0.0


def record(method, i, share_a, share_b, win_a, win_b, sensitivity, top2=True):
    return {"cfg": "c", "method": method, "id": str(i), "share_a": share_a, "share_b": share_b, "win_a": win_a,
            "win_b": win_b, "sensitivity": sensitivity, "top2": top2}


def test_summary_and_table():
    records = [record("m", 0, 0.8, 0.5, 1.0, 0.0, 0.25), record("m", 1, None, 0.2, 0.5, 1.0, 0.75, top2=False),
               record("m", 2, 1.0, 1.0, 1.0, 1.0, 1.0)]  # id 2 not asked for: ignored
    summary = summarise_class_specificity({("c", r["method"], r["id"]): r for r in records}, ["0", "1", "9"],
                                          ["m", "none"], "c")
    m = summary["results"]["m"]
    assert m["n"] == 2 and m["no_positive"] == 1
    assert m["positive_share"] == pytest.approx((0.8 + 0.5 + 0.2) / 3)
    assert m["win_rate"] == pytest.approx((1.0 + 0.0 + 0.5 + 1.0) / 4)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["top2"]["n"] == 1 and m["top2"]["positive_share"] == pytest.approx(0.65)
    assert summary["results"]["none"]["n"] == 0 and summary["results"]["none"]["win_rate"] is None
    assert summary["pairs_with_both_classes_in_top2"] == pytest.approx(0.5)
    table = markdown_table(summary)
    assert "| m | 50.0 | 62.5 | 0.500 | 2 | 1 |" in table and "| none | - | - | - | 0 | 0 |" in table


# ---------------------------------------------------------------- runs on pairs
@dataclass(frozen=True)
class Pair:
    """Bright item A (class la) in the left half, dimmer item B (class lb) in the right."""

    id: str
    la: int = 0
    lb: int = 1
    seed: int = 0

    def load(self):
        rng = np.random.default_rng(self.seed)
        image = rng.integers(0, 40, (*SIZE, 3)).astype(np.uint8)
        mask_a = np.zeros(SIZE, bool)
        mask_a[4:20, 2:14] = True
        mask_b = np.zeros(SIZE, bool)
        mask_b[10:28, 18:30] = True
        image[mask_a] = 250
        image[mask_b] = 160
        return Image.fromarray(image), (mask_a, mask_b), (self.la, self.lb)


class OracleExplainer(FakeExplainer):
    """Fake methods plus "oracle": class 0 -> left half of the patch grid, else right half."""

    def explain(self, pixel_values, method, target=None):
        if method != "oracle":
            return super().explain(pixel_values, method, target)
        self.calls.append((method, len(pixel_values)))
        with torch.no_grad():
            logits = self.model(pixel_values=pixel_values).logits
        side = IMAGE_SIZE // PATCH
        grid = torch.zeros(len(pixel_values), side, side)
        for i, t in enumerate(torch.as_tensor(target).tolist()):
            grid[i, :, : side // 2] = float(t == 0)
            grid[i, :, side // 2:] = float(t != 0)
        return FakeExplanation(grid.flatten(1), torch.as_tensor(target), logits)


def run(model, explainer, out, methods, pairs=None):
    pairs = pairs or [Pair(str(i), seed=i) for i in range(3)]
    return run_class_specificity(model, explainer, pairs, methods, out, ClassSpecificityConfig(SIZE),
                                 identity={"model": "tiny"}, batch_size=2, progress=False)


def test_run_with_fake_explainer_resumes_and_reports(tiny_vit, tmp_path):
    out = tmp_path / "run"
    explainer = OracleExplainer(tiny_vit)
    pairs = [Pair(str(i), seed=i) for i in range(3)] + [Pair("same", la=1, lb=1)]
    summary = run(tiny_vit, explainer, out, ["oracle", "bright"], pairs)
    assert [f["id"] for f in summary["failed"]] == ["same"]  # one class twice: reported, not scored
    oracle, bright = summary["results"]["oracle"], summary["results"]["bright"]
    assert oracle["n"] == 3 and oracle["win_rate"] == 1.0
    assert 0.8 < oracle["sensitivity"] < 1.0  # disjoint halves, blurred where bilinear upsampling meets
    assert 0.3 < oracle["positive_share"] < 0.5  # each half is ~40% item, ~60% background
    assert bright["sensitivity"] == 0.0 and bright["win_rate"] == 0.5  # ignores the target
    assert explainer.images == 2 * 2 * 3  # both classes, both methods, three pairs

    assert json.loads((out / "class_specificity_summary.json").read_text()) == summary
    assert (out / "class_specificity.md").read_text().startswith("| method |")
    assert Image.open(out / "class_specificity.png").format == "PNG"

    path = out / "class_specificity.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:7])  # torn last record
    resumed = OracleExplainer(tiny_vit)
    again = run(tiny_vit, resumed, out, ["oracle", "bright"], pairs)
    assert again["results"] == summary["results"]
    assert resumed.images == 2  # only the torn record is redone: one pair, two classes


def test_real_explainer_class_agnostic_methods_are_exact(tiny_vit, tmp_path):
    pairs = [Pair("0", 0, 1, 0), Pair("1", 2, 0, 1), Pair("2", 1, 2, 2)]
    methods = ["raw_attention", "rollout", "transformer_attribution"]
    summary = run(tiny_vit, relprop.Explainer(tiny_vit), tmp_path / "real", methods, pairs)
    for method in ("raw_attention", "rollout"):
        r = summary["results"][method]
        assert r["n"] == 3 and r["sensitivity"] == 0.0 and r["win_rate"] == 0.5
    assert summary["results"]["transformer_attribution"]["sensitivity"] > 0.0
