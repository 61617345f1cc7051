"""End-to-end runs with a tiny random ViT and a fake explainer: results, resumability,
interruption, unreadable samples and the CLI."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from relprop.cli import main
from relprop.errors import RunIdentityError
from relprop.eval import cli, datasets
from relprop.eval.images import Normalization, to_unit_tensor
from relprop.eval.metrics import perturbation_auc
from relprop.eval.perturbation import PerturbationConfig, run_perturbation
from relprop.eval.segmentation import SegmentationConfig, run_segmentation

from eval_fakes import IMAGE_SIZE, FakeExplainer, seg_folder, write_gtsegs_mat

METHODS = ["bright", "dark", "lrp"]
SIZE = (IMAGE_SIZE, IMAGE_SIZE)


def perturb(model, explainer, root, out, **config):
    config = PerturbationConfig(image_size=SIZE, **config)
    return run_perturbation(model, explainer, datasets.image_folder(root), METHODS, out, config,
                            identity={"model": "tiny"}, batch_size=2, forward_batch_size=7, progress=False)


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_perturbation_end_to_end(tiny_vit, fake_explainer, image_folder, tmp_path):
    out = tmp_path / "run"
    summary = perturb(tiny_vit, fake_explainer, image_folder, out)

    assert [f["id"] for f in summary["failed"]] == ["b/broken.JPEG"]  # reported, not dropped
    assert summary["samples"] == 7
    good = [s for s in datasets.image_folder(image_folder) if s.id != "b/broken.JPEG"]
    x = torch.stack([to_unit_tensor(s.load(), SIZE) for s in good])
    with torch.no_grad():
        clean = (tiny_vit(pixel_values=Normalization()(x)).logits.argmax(-1) == torch.tensor([s.label for s in good]))
    for method in METHODS:
        for mode in ("positive", "negative"):
            entry = summary["results"][method][mode]
            assert entry["n"] == 6 and len(entry["accuracy"]) == 10
            assert entry["accuracy"][0] == pytest.approx(clean.float().mean().item())
            assert entry["auc"] == pytest.approx(perturbation_auc(entry["accuracy"]))
    records = jsonl(out / "perturbation.jsonl")
    assert len(records) == 6 * 3 * 2
    assert all(r["explained"] == r["pred"] for r in records)  # predicted class explained by default
    assert json.loads((out / "perturbation_summary.json").read_text()) == summary
    assert Image.open(out / "perturbation.png").format == "PNG"


def test_true_class_target_and_blur_replacement(tiny_vit, fake_explainer, image_folder, tmp_path):
    summary = perturb(tiny_vit, fake_explainer, image_folder, tmp_path / "run", target="true", replace="blur",
                      modes=("negative",))
    assert set(summary["results"]["bright"]) == {"negative"}
    records = jsonl(tmp_path / "run" / "perturbation.jsonl")
    assert len(records) == 6 * 3 and all(r["explained"] == r["label"] for r in records)


def test_non_finite_maps_are_reported_not_scored(tiny_vit, image_folder, tmp_path):
    samples = datasets.image_folder(image_folder)
    summary = run_perturbation(tiny_vit, FakeExplainer(tiny_vit), samples, ["nan"], tmp_path / "p",
                               PerturbationConfig(image_size=SIZE), batch_size=2, progress=False)
    # batches of 2 readable images: a/img0+a/img1, b/img0+b/img1, c/img0+c/img1
    broken = {"a/img0.png", "b/img0.png", "c/img0.png"}
    assert {f["id"] for f in summary["failed"] if "non-finite" in f["error"]} == broken
    assert summary["results"]["nan"]["positive"]["n"] == 3
    seg = segment(tiny_vit, FakeExplainer(tiny_vit), datasets.mask_folder(seg_folder(tmp_path, broken=True)), tmp_path / "s",
                  methods=["nan"])
    assert seg["results"]["nan"]["n"] == 1 and len(seg["failed"]) == 3  # o0, o2 broken; bad.png unreadable


def test_rerun_skips_done_work_and_recovers_a_torn_line(tiny_vit, image_folder, tmp_path):
    out = tmp_path / "run"
    first = perturb(tiny_vit, FakeExplainer(tiny_vit), image_folder, out)
    again = FakeExplainer(tiny_vit)
    assert perturb(tiny_vit, again, image_folder, out)["results"] == first["results"]
    assert again.calls == []  # nothing recomputed

    # Simulate a crash mid-write: keep 20 full lines and half of the 21st.
    path = out / "perturbation.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:20]) + lines[20][: len(lines[20]) // 2])
    lost = {(r["id"], r["method"]) for r in map(json.loads, lines[20:])}
    resumed = FakeExplainer(tiny_vit)
    assert perturb(tiny_vit, resumed, image_folder, out)["results"] == first["results"]
    assert resumed.images == len(lost)  # only the lost (sample, method) pairs were explained
    keys = [(r["id"], r["method"], r["mode"]) for r in jsonl(path)]
    assert len(keys) == len(set(keys)) == 36


class Interrupted(Exception):
    pass


class CrashingExplainer(FakeExplainer):
    def __init__(self, model, after: int):
        super().__init__(model)
        self.after = after

    def explain(self, pixel_values, method, target=None):
        if len(self.calls) == self.after:
            raise Interrupted
        return super().explain(pixel_values, method, target)


def test_interrupted_run_loses_nothing(tiny_vit, image_folder, tmp_path):
    reference = perturb(tiny_vit, FakeExplainer(tiny_vit), image_folder, tmp_path / "reference")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        perturb(tiny_vit, CrashingExplainer(tiny_vit, after=4), image_folder, out)
    kept = len(jsonl(out / "perturbation.jsonl"))
    assert kept == 4 * 2 * 2  # 4 explain calls of 2 images, both modes each
    resumed = FakeExplainer(tiny_vit)
    assert perturb(tiny_vit, resumed, image_folder, out)["results"] == reference["results"]
    assert resumed.images == 6 * 3 - kept // 2


def test_changed_settings_are_refused_not_mixed_with_old_records(tiny_vit, image_folder, tmp_path):
    out = tmp_path / "run"
    perturb(tiny_vit, FakeExplainer(tiny_vit), image_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = FakeExplainer(tiny_vit)
    with pytest.raises(RunIdentityError, match=r"the settings differ \(replace 0.0 -> 0.5\).*--restart"):
        perturb(tiny_vit, other, image_folder, out, replace=0.5)
    assert other.images == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def segment(model, explainer, samples, out, methods=("bright", "lrp")):
    return run_segmentation(model, explainer, samples, list(methods), out, SegmentationConfig(SIZE),
                            identity={"model": "tiny"}, batch_size=2, progress=False)


def test_segmentation_end_to_end_and_resume(tiny_vit, tmp_path):
    samples = datasets.mask_folder(seg_folder(tmp_path, broken=True))
    out = tmp_path / "run"
    summary = segment(tiny_vit, FakeExplainer(tiny_vit), samples, out)
    assert [f["id"] for f in summary["failed"]] == ["bad.png"]
    lrp = summary["results"]["lrp"]
    assert lrp["n"] == 3
    assert lrp["pixel_accuracy"] == pytest.approx(1.0)
    assert lrp["iou"] == pytest.approx([1.0, 1.0]) and lrp["mIoU"] == pytest.approx(1.0)
    assert lrp["mAP"] == pytest.approx(1.0)
    bright = summary["results"]["bright"]  # coarse patch map: imperfect but sane
    assert 0.5 < bright["pixel_accuracy"] < 1.0 and 0.0 < bright["mIoU"] < 1.0

    path = out / "segmentation.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:10])  # torn last record
    resumed = FakeExplainer(tiny_vit)
    assert segment(tiny_vit, resumed, samples, out)["results"] == summary["results"]
    assert resumed.images == 1


def test_cli_runs_both_benchmarks(tiny_vit, image_folder, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    tiny_vit.save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2], "size": {"height": 32, "width": 32}}))
    monkeypatch.setattr(cli, "make_explainer", lambda model, methods, start_layer=None: FakeExplainer(model))
    parser = argparse.ArgumentParser(prog="relprop")
    cli.register(parser.add_subparsers(dest="command"))
    common = ["--model", str(model_dir), "--methods", "bright", "lrp", "--device", "cpu", "--no-progress"]

    args = parser.parse_args(["eval", "perturbation", "--data", str(image_folder), "--out", str(tmp_path / "p"),
                              "--mode", "negative", "--rank", "patch", "--batch-size", "4", *common])
    assert args.run(args) == 0
    summary = json.loads((tmp_path / "p" / "perturbation_summary.json").read_text())
    assert summary["settings"]["normalization"] == {"mean": [0.4] * 3, "std": [0.2] * 3}
    assert summary["settings"]["image_size"] == [32, 32] and summary["settings"]["patch_size"] == 8
    assert summary["results"]["lrp"]["negative"]["n"] == 6 and len(summary["failed"]) == 1
    assert "negative AUC" in capsys.readouterr().out

    rng = np.random.default_rng(0)
    mat = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs_mat(mat, [(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), (rng.random((20, 24)) > 0.5))
                           for _ in range(3)])
    args = parser.parse_args(["eval", "segmentation", "--data", str(mat), "--out", str(tmp_path / "s"),
                              "--limit", "2", *common])
    assert args.run(args) == 0
    summary = json.loads((tmp_path / "s" / "segmentation_summary.json").read_text())
    assert summary["samples"] == 2 and summary["results"]["bright"]["n"] == 2


def test_cli_reports_a_missing_model_clearly(tmp_path, capsys):
    # eval.cli.run raises; relprop.cli.main prints the one line and returns the exit code
    assert main(["eval", "perturbation", "--model", str(tmp_path / "nope"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    assert "relprop: error: model folder not found" in capsys.readouterr().err
