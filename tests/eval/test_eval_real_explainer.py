"""One tiny end-to-end run of both benchmarks through the top-level CLI with the real
Explainer and the default method list, which must hold every method of relprop.methods()."""
from __future__ import annotations

import json

import numpy as np

import relprop
from relprop.cli import main
from eval_fakes import write_gtsegs_mat


def test_all_methods_through_relprop_cli(tiny_vit, image_folder, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_vit.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--no-progress"]
    assert main(["eval", "perturbation", "--data", str(image_folder), "--out", str(tmp_path / "p"),
                 "--mode", "both", *common]) == 0
    summary = json.loads((tmp_path / "p" / "perturbation_summary.json").read_text())
    assert set(summary["results"]) == set(relprop.methods())
    for method, result in summary["results"].items():
        for mode in ("positive", "negative"):
            assert result[mode]["n"] == 6, (method, mode)
            assert 0 <= result[mode]["auc"] <= 90
    assert (tmp_path / "p" / "perturbation.png").stat().st_size > 0

    rng = np.random.default_rng(0)
    mat = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs_mat(mat, [(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), rng.random((20, 24)) > 0.5)
                           for _ in range(2)])
    assert main(["eval", "segmentation", "--data", str(mat), "--out", str(tmp_path / "s"), *common]) == 0
    summary = json.loads((tmp_path / "s" / "segmentation_summary.json").read_text())
    assert set(summary["results"]) == set(relprop.methods())
    assert all(r["n"] == 2 for r in summary["results"].values())


def test_start_layer_and_options_reach_the_methods(tiny_vit):
    import torch
    from relprop.eval.cli import parse_options
    from relprop.eval.runner import method_explain

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explainer = relprop.Explainer(tiny_vit)
    methods = ["transformer_attribution", "rollout", "lrp"]
    authors = parse_options([], 1, methods)
    assert authors == {"transformer_attribution": {"start_layer": 1}, "rollout": {"start_layer": 1}}
    assert parse_options(["rollout:start_layer=1", "transformer_attribution:start_layer=1"], None, methods) == authors
    for method in ("transformer_attribution", "rollout"):
        expected = explainer.explain(x, method, start_layer=1).relevance
        assert torch.equal(method_explain(explainer, method, authors[method])(x).relevance, expected)
        assert not torch.equal(method_explain(explainer, method, {})(x).relevance, expected)
