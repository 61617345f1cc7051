"""End-to-end CLI runs on the golden model saved as a folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from relprop.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory, vit_inputs):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(3):
        path = folder / f"img{i}.png"
        Image.fromarray(vit_inputs["images_u8"][i].permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    return paths


def test_explain_writes_overlays_and_maps(vit_folder, images, tmp_path, capsys, vit_model):
    out = tmp_path / "out"
    assert main(["explain", *images, "--model", str(vit_folder), "--top-k", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("LABEL_") == 6 and "img0.png: LABEL_9" in printed     # golden prediction for image 0
    pngs, maps = sorted(out.glob("*.png")), sorted(out.glob("*.npy"))
    assert len(pngs) == len(maps) == 6
    assert Image.open(pngs[0]).size == (224, 224)
    grid = np.load(out / "img0_transformer_attribution_class9_LABEL_9.npy")
    assert grid.shape == (14, 14) and np.isfinite(grid).all()
    assert not list(out.glob("*.part"))


def test_cli_map_equals_library_map(vit_folder, images, tmp_path, vit_model, vit_inputs):
    # the model's own preprocessing reproduces the golden input; rollout is well-conditioned in
    # float32 (the LRP-based maps are not: rounding-level input changes move them visibly)
    import relprop
    out = tmp_path / "out"
    assert main(["explain", images[0], "--model", str(vit_folder), "--method", "rollout", "--out", str(out)]) == 0
    grid = np.load(out / "img0_rollout_class9_LABEL_9.npy")
    expected = relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], "rollout").as_grid()[0]
    assert np.allclose(grid, expected.numpy(), rtol=1e-5, atol=0)


def test_explain_target_by_label_and_method(vit_folder, images, tmp_path):
    out = tmp_path / "out"
    assert main(["explain", images[0], "--model", str(vit_folder), "--target", "LABEL_3", "--method", "lrp",
                 "--out", str(out)]) == 0
    assert np.load(out / "img0_lrp_class3_LABEL_3.npy").shape == (224, 224)


def test_explain_errors(vit_folder, images, tmp_path, capsys, monkeypatch):
    assert main(["explain", images[0], "--model", str(vit_folder), "--target", "zebra", "--out", str(tmp_path)]) == 2
    assert "unknown label 'zebra'" in capsys.readouterr().err
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["explain", str(bad), images[0], "--model", str(vit_folder), "--out", str(tmp_path / "o")]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["explain", images[0], "--model", "google/vit-base-patch16-224", "--out", str(tmp_path)]) == 2
    assert "could not be fetched" in capsys.readouterr().err
