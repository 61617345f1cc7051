"""Fashion canvases as benchmark samples: the glue, the runners on them, and the CLI's
``--format fashion`` / ``class-specificity``. Uses a fake Fashion-MNIST folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from relprop.datasets import CanvasConfig, make_canvas, make_pair_canvas
from relprop.errors import UsageError
from relprop.eval import cli, fashion
from relprop.eval.perturbation import PerturbationConfig, run_perturbation
from relprop.eval.segmentation import SegmentationConfig, run_segmentation

from eval_fakes import IMAGE_SIZE, FakeExplainer
from tests.conftest import write_fake_fashion_mnist

SIZE = (IMAGE_SIZE, IMAGE_SIZE)
SMALL = CanvasConfig(size=IMAGE_SIZE, item_size=(14, 24), pair_item_size=(10, 16), fragment_crop=(8, 12))


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    """12 items per split, classes 0, 1, 2 (as the tiny ViT's), bright blobs of varied size."""
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), np.arange(12) % 3, 5, 7, 120)


def test_samples_are_the_canvases(fmnist_root):
    images = fashion.canvas_images(4, config=SMALL, root=fmnist_root, start=2)
    assert [s.id for s in images] == ["test/0/2", "test/0/3", "test/0/4", "test/0/5"]
    assert [s.label for s in images] == [2, 0, 1, 2]
    canvas, mask, label = make_canvas("test", 3, 0, SMALL, fmnist_root)
    loaded = images[1].load()
    assert loaded.mode == "RGB" and np.array_equal(np.array(loaded), canvas) and label == images[1].label

    seg = fashion.canvas_segmentation(4, config=SMALL, root=fmnist_root, start=2)
    assert [s.id for s in seg] == [s.id for s in images]
    image, seg_mask = seg[1].load()
    assert np.array_equal(np.array(image), canvas) and np.array_equal(seg_mask > 0, mask)

    pair = fashion.pair_samples(2, seed=5, config=SMALL, root=fmnist_root)[1]
    image, (ma, mb), labels = pair.load()
    ref_image, (ra, rb), ref_labels = make_pair_canvas("test", 1, 5, SMALL, fmnist_root)
    assert pair.id == "test/5/1" and labels == ref_labels and labels[0] != labels[1]
    assert np.array_equal(np.array(image), ref_image) and np.array_equal(ma, ra) and np.array_equal(mb, rb)

    assert len(fashion.canvas_images(config=SMALL, root=fmnist_root)) == 12  # whole split by default
    with pytest.raises(ValueError, match="out of range"):
        fashion.canvas_images(5, root=fmnist_root, start=10)


def test_identity_names_the_canvases(fmnist_root):
    identity = fashion.canvas_identity(seed=3, config=SMALL, root=fmnist_root)
    assert identity["canvas_seed"] == 3 and identity["canvas_config"]["size"] == IMAGE_SIZE
    assert identity["data_root"] == str(fmnist_root.resolve())
    json.dumps(identity)  # storable in the run settings


def test_runners_take_canvases(tiny_vit, fmnist_root, tmp_path):
    explainer = FakeExplainer(tiny_vit)
    identity = fashion.canvas_identity(config=SMALL, root=fmnist_root)
    samples = fashion.canvas_images(5, config=SMALL, root=fmnist_root)
    summary = run_perturbation(tiny_vit, explainer, samples, ["bright", "lrp"], tmp_path / "p",
                               PerturbationConfig(image_size=SIZE), identity, batch_size=2, forward_batch_size=16,
                               progress=False)
    assert summary["results"]["lrp"]["negative"]["n"] == 5 and not summary["failed"]

    seg = run_segmentation(tiny_vit, explainer, fashion.canvas_segmentation(5, config=SMALL, root=fmnist_root),
                           ["lrp", "dark"], tmp_path / "s", SegmentationConfig(SIZE), identity, batch_size=2,
                           progress=False)
    # The fake "lrp" map is the pixel intensity: the bright item outranks the dim clutter, so
    # the masks line up with the images; "dark" ranks the other way round.
    assert seg["results"]["lrp"]["n"] == 5 and seg["results"]["lrp"]["mAP"] > 0.9
    assert seg["results"]["dark"]["mAP"] < 0.5


def test_cli_fashion_format_and_class_specificity(tiny_vit, fmnist_root, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    tiny_vit.save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    monkeypatch.setattr(cli, "make_explainer", lambda model, methods, start_layer=None: FakeExplainer(model))
    parser = argparse.ArgumentParser(prog="relprop")
    cli.register(parser.add_subparsers(dest="command"))
    common = ["--model", str(model_dir), "--data", str(fmnist_root), "--methods", "bright", "lrp",
              "--device", "cpu", "--no-progress", "--limit", "3"]

    args = parser.parse_args(["eval", "perturbation", "--format", "fashion", "--out", str(tmp_path / "p"), *common])
    assert args.run(args) == 0
    summary = json.loads((tmp_path / "p" / "perturbation_summary.json").read_text())
    assert summary["samples"] == 3 and summary["settings"]["data"] == "fashion_canvas"
    assert summary["settings"]["labels"] == "fashion-mnist"

    args = parser.parse_args(["eval", "segmentation", "--format", "fashion", "--out", str(tmp_path / "s"), *common])
    assert args.run(args) == 0
    assert json.loads((tmp_path / "s" / "segmentation_summary.json").read_text())["results"]["lrp"]["n"] == 3

    args = parser.parse_args(["eval", "class-specificity", "--out", str(tmp_path / "c"), *common])
    assert args.run(args) == 0
    summary = json.loads((tmp_path / "c" / "class_specificity_summary.json").read_text())
    assert summary["results"]["bright"]["n"] == 3 and summary["results"]["bright"]["sensitivity"] == 0.0
    assert summary["settings"]["data"] == "fashion_pairs"
    assert "| bright |" in capsys.readouterr().out

    args = parser.parse_args(["eval", "perturbation", "--format", "fashion", "--labels", "model",
                              "--out", str(tmp_path / "x"), *common])
    with pytest.raises(UsageError, match="--labels does not apply"):  # labels are the dataset's own
        args.run(args)
