"""``relprop eval`` as users run it: the real command in a subprocess, asserting the exit code,
the one-line message and the files. Setup runs use ``relprop.cli.main`` in-process (no 4 s
start-up); every asserted run is a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from relprop.cli import main
from relprop.eval.cli import DEFAULT_METHODS
from relprop.eval.rundir import LOCK_FILE
from tests.conftest import assert_cli_error, run_relprop, run_relprop_many

from eval_fakes import make_tiny_vit, random_image

BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "vision_fashion"
RESULTS = ("perturbation.jsonl", "perturbation_summary.json")


def image_folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            random_image(rng).save(root / name / f"img{k:02d}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny ViT's folder (32x32 inputs) and 3 classes of 14 images."""
    root = tmp_path_factory.mktemp("eval_cli")
    make_tiny_vit().save_pretrained(root / "model")
    return root / "model", image_folder(root / "images", 14)


def command(model, data, out, *extra):
    return ("eval", "perturbation", "--model", model, "--data", data, "--out", out, "--no-progress", *extra)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "perturbation.jsonl").read_text().splitlines()]


def keys(out: Path) -> list[tuple]:
    return [(r["method"], r["mode"], r["id"]) for r in records(out)]


# One real command per way of refusing: name -> (extra arguments, data folder, phrases in stderr).
USAGE_ERRORS = {
    "limit negative": (["--limit", "-3"], "images", ["argument --limit: expected a positive integer, got '-3'"]),
    "replace nan": (["--replace", "nan"], "images",
                    ["argument --replace: expected a number in [0, 1] (image space) or 'blur', got 'nan'"]),
    "empty data folder": ([], "empty", ["relprop: error: no images in", "<class>/<image>"]),
    "no readable images": ([], "unreadable", ["relprop: error: no sample could be evaluated: all 2 failed",
                                              "a/x.png: UnidentifiedImageError", "check the data (--data)"]),
    "image size the model cannot take": (["--image-size", "32"], "images", [
        "relprop: error: --image-size 32 32: the model cannot take 32x32 images, it takes 224x224"]),
    "device cuda without cuda": (["--device", "cuda"], "images", [
        "relprop: error: --device cuda is not available here", "use --device cpu"]),
    "device bogus": (["--device", "bogus"], "images",
                     ["relprop: error: --device 'bogus' is not a torch device; use cpu, cuda, cuda:N or mps"]),
    "out names a file": ([], "images", ["relprop: error: --out", "is a file, not a folder"]),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_arguments_that_cannot_work_are_one_line_usage_errors(case, setup, vit_folder, tmp_path):
    extra, folder, phrases = USAGE_ERRORS[case]
    if case == "device cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, images = setup
    data = {"images": images, "empty": tmp_path / "empty", "unreadable": tmp_path / "unreadable"}[folder]
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable" / "a").mkdir(parents=True)
    for name in ("x.png", "y.jpg"):
        (tmp_path / "unreadable" / "a" / name).write_bytes(b"not an image")
    out = tmp_path / "out"
    if case == "out names a file":
        out.write_text("keep me")
    model = vit_folder if case == "image size the model cannot take" else model  # a 224x224 ViT

    stderr = assert_cli_error(run_relprop(*command(model, data, out, "--methods", "rollout", *extra)), 2, *phrases)
    assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr
    if out.is_file():
        assert out.read_text() == "keep me"
    else:
        assert not any((out / name).exists() for name in RESULTS)  # no results, no silent success


REFUSED_VALUES = [
    ("--limit", "0", "expected a positive integer, got '0'"),
    ("--image-size", "0", "expected a positive integer, got '0'"),
    ("--batch-size", "0", "expected a positive integer, got '0'"),
    ("--forward-batch-size", "0", "expected a positive integer, got '0'"),
    ("--replace", "inf", "expected a number in [0, 1] (image space) or 'blur', got 'inf'"),
    ("--replace", "1.5", "expected a number in [0, 1] (image space) or 'blur', got '1.5'"),
    ("--replace", "-0.1", "expected a number in [0, 1] (image space) or 'blur', got '-0.1'"),
]


def test_counts_sizes_and_replacement_values_that_do_nothing_are_refused(tmp_path):
    outs = [tmp_path / f"out{i}" for i in range(len(REFUSED_VALUES))]
    results = run_relprop_many([command("model", "data", out, f"{option}={value}")
                                for out, (option, value, _) in zip(outs, REFUSED_VALUES)])
    for out, (option, value, phrase), result in zip(outs, REFUSED_VALUES, results):
        err = assert_cli_error(result, 2, f"argument {option}: {phrase}")
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_rerun_after_new_weights_refuses_then_restart_keeps_the_old_results(setup, tmp_path):
    model, images = setup
    model_dir, out = shutil.copytree(model, tmp_path / "model"), tmp_path / "out"
    args = command(model_dir, images, out, "--methods", "rollout", "--limit", "4")
    assert main(list(map(str, args))) == 0
    before = {name: (out / name).read_bytes() for name in (*RESULTS, "perturbation_run.json")}
    retrained = make_tiny_vit()
    with torch.no_grad():
        retrained.classifier.bias += 1  # new weights, same folder
    retrained.save_pretrained(model_dir)

    refused = run_relprop(*args)
    assert_cli_error(refused, 2, f"relprop: error: {out} holds perturbation results of another model: the model "
                                 "weights differ", "Use another --out, or --restart")
    assert {name: (out / name).read_bytes() for name in before} == before  # untouched, nothing mixed in

    restarted = run_relprop(*args, "--restart")
    assert restarted.returncode == 0, restarted.stderr
    (previous,) = out.glob("previous-*")
    assert f"moved the earlier perturbation results of {out} into {previous}" in restarted.stderr
    assert {name: (previous / name).read_bytes() for name in before} == before
    stored = json.loads((out / "perturbation_run.json").read_text())["model_weights"]
    assert stored != json.loads(before["perturbation_run.json"])["model_weights"]
    assert len(records(out)) == 4 * 2 and all(r["cfg"] != json.loads(before["perturbation_summary.json"])
                                              ["settings_id"] for r in records(out))


def test_result_folder_from_before_run_records_gives_a_clear_message(setup, tmp_path):
    model, _ = setup
    old = shutil.copytree(BENCHMARK_RESULTS / "segmentation", tmp_path / "segmentation")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    masks = tmp_path / "seg"
    (masks / "images").mkdir(parents=True)
    (masks / "masks").mkdir()
    random_image(np.random.default_rng(0), (32, 32)).save(masks / "images" / "x.png")
    random_image(np.random.default_rng(1), (32, 32)).convert("L").save(masks / "masks" / "x.png")

    result = run_relprop("eval", "segmentation", "--model", model, "--data", masks, "--out", old, "--no-progress",
                         "--methods", "rollout")
    assert_cli_error(result, 2, f"relprop: error: {old} holds segmentation results without a run record",
                     "--restart")
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.name != LOCK_FILE} == before


def start_in_background(args) -> tuple[threading.Thread, dict]:
    """``run_relprop(*args)`` in a thread; its CompletedProcess lands in the dict under "result"."""
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", run_relprop(*args)))
    worker.start()
    return worker, outcome


def wait_for_records(out: Path, workers: list[threading.Thread], at_least: int) -> int:
    """Wait until the run holding ``out`` has stored ``at_least`` records; returns its pid (the
    lock file holds it). One of ``workers`` (the runs' threads) must still be running."""
    path, deadline = out / "perturbation.jsonl", time.monotonic() + 120
    while not (path.exists() and path.read_bytes().count(b"\n") >= at_least):
        assert any(worker.is_alive() for worker in workers), "the runs ended before storing the records waited for"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return int((out / LOCK_FILE).read_text())


def test_two_evals_into_one_folder_one_refused_no_record_twice(setup, tmp_path):
    model, images = setup
    out = tmp_path / "out"
    args = command(model, images, out, "--batch-size", "1", "--limit", "14")
    runs = [start_in_background(args) for _ in range(2)]  # started together
    holder = wait_for_records(out, [worker for worker, _ in runs], 1)  # the one that took the lock
    os.kill(holder, signal.SIGSTOP)  # hold it mid-way, so the other surely meets the lock
    try:
        while sum(worker.is_alive() for worker, _ in runs) > 1:
            time.sleep(0.05)
    finally:
        os.kill(holder, signal.SIGCONT)
    for worker, _ in runs:
        worker.join(120)

    done, refused = sorted((outcome["result"] for _, outcome in runs), key=lambda result: result.returncode)
    assert done.returncode == 0, done.stderr
    assert_cli_error(refused, 1, f"relprop: error: another relprop eval is using {out} (pid {holder}); wait for it "
                                 "or use another --out")
    assert len(keys(out)) == len(set(keys(out))) == 14 * len(DEFAULT_METHODS) * 2
    summary = json.loads((out / "perturbation_summary.json").read_text())
    assert all(r[mode]["n"] == 14 for r in summary["results"].values() for mode in ("positive", "negative"))


def test_ctrl_c_is_one_line_and_the_rerun_resumes_losing_nothing(setup, tmp_path):
    model, images = setup
    out = tmp_path / "out"
    args = command(model, images, out, "--batch-size", "1", "--limit", "14")
    worker, outcome = start_in_background(args)
    os.kill(wait_for_records(out, [worker], len(DEFAULT_METHODS) * 2 + 1), signal.SIGINT)  # a first image done, a second begun
    worker.join(120)
    stderr = assert_cli_error(outcome["result"], 130, "relprop: error: interrupted; rerun the same command to "
                                                      f"resume (finished results are kept in {out})")
    assert len([line for line in stderr.splitlines() if "error:" in line]) == 1
    kept = (out / "perturbation.jsonl").read_text()
    ids = [r["id"] for r in records(out)]
    done = {i for i in ids if ids.count(i) == len(DEFAULT_METHODS) * 2}
    assert done and not (out / "perturbation_summary.json").exists()

    rerun = run_relprop(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(done)} of 14 samples already done" in rerun.stderr
    assert (out / "perturbation.jsonl").read_text().startswith(kept)  # nothing lost
    assert len(keys(out)) == len(set(keys(out))) == 14 * len(DEFAULT_METHODS) * 2  # nothing twice
