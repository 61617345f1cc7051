"""``relprop eval ... --launcher torchrun --nproc-per-node 2`` on CPU (gloo): the per-sample
records equal a single-process run's; a rank killed mid-run and a rerun lose and duplicate
nothing; an error is reported once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from relprop.errors import RunIdentityError, UsageError
from relprop.eval import datasets
from relprop.eval.perturbation import PerturbationBenchmark, PerturbationConfig
from relprop.eval.runner import Shard, SilentRankError, rank_file, run_benchmark
from tests.conftest import _relprop_command

from eval_fakes import IMAGE_SIZE, make_tiny_vit, random_image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
METHODS = ("rollout", "lrp")
N_IMAGES = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = make_tiny_vit()
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for k in range(N_IMAGES):
        (root / "images" / "abc"[k % 3]).mkdir(parents=True, exist_ok=True)
        random_image(rng).save(root / "images" / "abc"[k % 3] / f"img{k:02d}.png")
    return model, root / "model", root / "images"


def single_process(model, images: Path, out: Path) -> dict:
    """The reference: the same run in one process (records, summary)."""
    import relprop

    benchmark = PerturbationBenchmark(model, datasets.image_folder(images),
                                      PerturbationConfig(image_size=(IMAGE_SIZE, IMAGE_SIZE), modes=("positive",)),
                                      identity={"data": "imagefolder", "labels": "sorted-folders"})
    return run_benchmark(benchmark, relprop.Explainer(model), METHODS, out, batch_size=1, progress=False)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def torchrun(model_dir: Path, images: Path, out: Path, launcher: bool) -> subprocess.Popen:
    """Two ranks, through ``relprop eval ... --launcher torchrun`` or plain ``torchrun -m relprop``."""
    command, env = _relprop_command(["eval", "perturbation", "--model", model_dir, "--data", images, "--out", out,
                                     "--methods", *METHODS, "--mode", "positive", "--batch-size", "1"],
                                    {"OMP_NUM_THREADS": "1"})
    if launcher:
        command += ["--launcher", "torchrun", "--nproc-per-node", "2"]
    else:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's worker process of ``rank`` (from its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_two_ranks_equal_one_process_and_a_killed_rank_resumes(setup, tmp_path):
    model, model_dir, images = setup
    summary = single_process(model, images, tmp_path / "single")
    reference = sorted(lines(tmp_path / "single" / "perturbation.jsonl"))
    assert len(reference) == N_IMAGES * len(METHODS)

    # Once rank 1 has stored a record, freeze both ranks (so neither can finish meanwhile), kill
    # rank 1 and let rank 0 go on: torchrun stops it.
    out = tmp_path / "dist"
    launch = torchrun(model_dir, images, out, launcher=True)
    deadline = time.time() + 120
    while time.time() < deadline and launch.poll() is None:
        path = rank_file(out, "perturbation", 1)
        if path.is_file() and path.stat().st_size:
            ranks = [worker(launch.pid, 1), worker(launch.pid, 0)]
            if None not in ranks:
                for pid in ranks:
                    os.kill(pid, signal.SIGSTOP)
                os.kill(ranks[0], signal.SIGKILL)
                os.kill(ranks[1], signal.SIGCONT)
                break
        time.sleep(0.01)
    _, err = launch.communicate(timeout=120)
    assert launch.returncode == 1 and "Traceback" not in err, err
    assert "relprop: error: processes were stopped (" in err and "rank 1 by signal 9 (SIGKILL)" in err, err
    assert not (out / "perturbation_summary.json").exists()
    left = [line for path in out.glob("perturbation*.jsonl") for line in lines(path)]
    assert 0 < len(left) < len(reference), "the kill came too late to test resuming"

    # The rerun (plain torchrun) merges what the killed run left and does the rest.
    launch = torchrun(model_dir, images, out, launcher=False)
    stdout, err = launch.communicate(timeout=120)
    assert launch.returncode == 0, err
    assert "Traceback" not in err and "rollout" in stdout
    assert not list(out.glob("perturbation.rank*.jsonl"))  # merged
    merged = lines(out / "perturbation.jsonl")
    assert sorted(merged) == reference  # nothing lost, nothing twice, bit-identical records
    stored = json.loads((out / "perturbation_summary.json").read_text())
    assert stored["results"] == summary["results"] and stored["settings_id"] == summary["settings_id"]
    assert (out / "perturbation.png").stat().st_size > 0


class FakeShard(Shard):
    """A rank of a two-rank run whose other rank's answers are given."""

    def __init__(self, rank: int, others: list):
        super().__init__(rank, 2)
        object.__setattr__(self, "others", others)

    def gather(self, value):
        return [value, *self.others] if self.rank == 0 else [*self.others, value]


def test_an_error_is_raised_once_on_the_failing_rank_and_silently_elsewhere():
    failure = RunIdentityError("other settings")
    with pytest.raises(RunIdentityError):
        FakeShard(0, [None]).agree(failure)  # rank 0 fails: it prints
    with pytest.raises(SilentRankError) as silent:
        FakeShard(1, [("RunIdentityError", "other settings", failure.exit_code)]).agree(None)
    assert silent.value.exit_code == UsageError.exit_code == failure.exit_code
    FakeShard(0, [None]).agree(None)  # nobody failed
    assert [Shard(r, 3).take(list(range(8))) for r in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
