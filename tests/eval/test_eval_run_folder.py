"""The run folder (``relprop.eval.rundir``) and the store, in-process: what a run's identity
covers (model weights by content, data per sample, settings), refusals instead of mixing,
``restart``, the lock, records never stored twice, masks of the wrong size, and runs in which
every sample failed."""

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from relprop.errors import InputError, RunFailure, RunIdentityError
from relprop.eval import datasets
from relprop.eval.perturbation import PerturbationConfig, run_perturbation
from relprop.eval.rundir import LOCK_FILE, folder_lock, model_fingerprint, source_fingerprints
from relprop.eval.segmentation import SegmentationConfig, run_segmentation
from relprop.eval.store import ResultStore

from eval_fakes import IMAGE_SIZE, FakeExplainer, make_tiny_vit, seg_folder

SIZE = (IMAGE_SIZE, IMAGE_SIZE)
METHODS = ["bright", "lrp"]
BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "vision_fashion"


def perturb(model, root, out, explainer=None, samples=None, **options):
    config = PerturbationConfig(image_size=SIZE, replace=options.pop("replace", 0.0))
    return run_perturbation(model, explainer or FakeExplainer(model), samples or datasets.image_folder(root),
                            METHODS, out, config, identity={"data": "imagefolder"}, batch_size=2,
                            forward_batch_size=16, progress=False, **options)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != LOCK_FILE}


def test_model_fingerprint_is_the_weights_content():
    model = make_tiny_vit()
    same = copy.deepcopy(model)
    assert model_fingerprint(same) == model_fingerprint(model)  # another object (folder) with equal weights
    with torch.no_grad():
        same.classifier.bias[0] += 1e-6  # one number of 20k
    assert model_fingerprint(same) != model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).double()) != model_fingerprint(model)  # dtype counts

    net = torch.nn.BatchNorm1d(3)
    before = model_fingerprint(net)
    net.running_mean += 1  # buffers count, not only parameters
    assert model_fingerprint(net) != before


def test_source_fingerprints_follow_label_size_and_mtime(image_folder):
    samples = datasets.image_folder(image_folder)
    before = source_fingerprints(samples)
    assert len(set(before.values())) > 1 and before == source_fingerprints(samples)
    path = image_folder / "a" / "img0.png"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = source_fingerprints(samples)
    assert {i for i in before if before[i] != after[i]} == {"a/img0.png"}
    relabelled = datasets.image_folder(image_folder, {"a": 5, "b": 1, "c": 2})
    assert {i for i, f in source_fingerprints(relabelled).items() if f != after[i]} == {"a/img0.png", "a/img1.png"}


def test_new_weights_are_refused_and_nothing_is_touched(image_folder, tmp_path):
    model, out = make_tiny_vit(), tmp_path / "run"
    perturb(model, image_folder, out)
    before = files(out)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.classifier.weight.mul_(2)
    explainer = FakeExplainer(retrained)
    with pytest.raises(RunIdentityError, match="the model weights differ.*--restart"):
        perturb(retrained, image_folder, out, explainer)
    assert explainer.calls == [] and files(out) == before


def test_changed_data_is_refused_but_more_samples_resume(image_folder, tmp_path):
    model, out = make_tiny_vit(), tmp_path / "run"
    samples = datasets.image_folder(image_folder)
    perturb(model, image_folder, out, samples=samples[:3])
    grown = FakeExplainer(model)
    summary = perturb(model, image_folder, out, grown, samples=samples)  # --limit raised: the 4 new readable ones
    assert grown.images == 4 * len(METHODS) and summary["results"]["lrp"]["positive"]["n"] == 6
    before = files(out)

    Image.new("RGB", (40, 48), "white").save(image_folder / "a" / "img1.png")  # overwritten in place
    explainer = FakeExplainer(model)
    with pytest.raises(RunIdentityError, match=r"the data differ for 1 samples .*'a/img1.png'"):
        perturb(model, image_folder, out, explainer)
    assert explainer.calls == [] and files(out) == before


def test_results_without_a_run_record_are_refused(image_folder, tmp_path):
    model, out = make_tiny_vit(), tmp_path / "run"
    perturb(model, image_folder, out)
    (out / "perturbation_run.json").unlink()  # as written by relprop before run records
    with pytest.raises(RunIdentityError, match="without a run record"):
        perturb(model, image_folder, out)

    # a committed benchmark folder: summaries only (the JSONL is not in git)
    old = shutil.copytree(BENCHMARK_RESULTS / "segmentation", tmp_path / "segmentation")
    before = files(old)
    samples = datasets.mask_folder(seg_folder(tmp_path))
    with pytest.raises(RunIdentityError, match="segmentation results without a run record"):
        run_segmentation(model, FakeExplainer(model), samples, ["lrp"], old, SegmentationConfig(SIZE),
                         progress=False)
    assert files(old) == before


def test_restart_moves_the_old_results_aside(image_folder, tmp_path, caplog):
    model, out = make_tiny_vit(), tmp_path / "run"
    perturb(model, image_folder, out)
    before = files(out)
    explainer = FakeExplainer(model)
    with caplog.at_level(logging.WARNING):
        summary = perturb(model, image_folder, out, explainer, replace=0.5, restart=True)
    (previous,) = out.glob("previous-*")
    assert files(previous) == before  # nothing destroyed
    assert f"moved the earlier perturbation results of {out} into {previous}" in caplog.text
    assert explainer.images == 6 * len(METHODS) and summary["settings"]["replace"] == 0.5
    assert json.loads((out / "perturbation_run.json").read_text())["settings"]["replace"] == 0.5
    assert perturb(model, image_folder, out, replace=0.5)["results"] == summary["results"]  # resumes now


def test_a_folder_in_use_is_refused(image_folder, tmp_path):
    model, out = make_tiny_vit(), tmp_path / "run"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(RunFailure, match=f"another relprop eval is using {out} \\(pid {os.getpid()}\\)"):
            perturb(model, image_folder, out)
    assert not (out / "perturbation.jsonl").exists()
    perturb(model, image_folder, out)  # released


def test_store_never_holds_a_record_twice(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    lines = [{"id": "x", "v": 1}, {"id": "y", "v": 2}, {"id": "x", "v": 3}]  # two writers without the lock
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with caplog.at_level(logging.WARNING), ResultStore(path, ("id",)) as store:
        assert store.records == {("x",): {"id": "x", "v": 1}, ("y",): {"id": "y", "v": 2}}
        store.add([{"id": "y", "v": 9}, {"id": "z", "v": 4}, {"id": "z", "v": 5}])
    assert "removing 1 duplicate records" in caplog.text
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": "x", "v": 1}, {"id": "y", "v": 2}, {"id": "z", "v": 4}]


def test_a_mask_of_another_size_fails_its_sample(tmp_path):
    model = make_tiny_vit()
    samples = datasets.mask_folder(seg_folder(tmp_path, mask_size=(16, 24)))
    summary = run_segmentation(model, FakeExplainer(model), samples, ["lrp"], tmp_path / "out",
                               SegmentationConfig(SIZE), progress=False)
    assert summary["failed"] == [{"id": "o1.png", "error": "InputError: its mask is 16x24 but the image is 32x32 "
                                  "(height x width); a mask must have its image's size"}]
    assert summary["results"]["lrp"]["n"] == 2 and summary["results"]["lrp"]["mIoU"] == pytest.approx(1.0)


def test_a_run_in_which_every_sample_fails_is_an_error(tmp_path):
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    for name in ("x.png", "y.jpg"):
        (root / "a" / name).write_bytes(b"not an image")
    model = make_tiny_vit()
    with pytest.raises(InputError, match=r"no sample could be evaluated: all 2 failed \(e.g. a/x.png: "):
        perturb(model, root, tmp_path / "out")
    assert not (tmp_path / "out" / "perturbation_summary.json").exists()
