"""Shared fixtures: the golden models (authors' reference numbers) and small stock models."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# ./run test runs the suite in 2 worker processes (pytest-xdist): one thread each keeps 2 cores busy
# without oversubscribing them; a single process keeps 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLDEN = Path(__file__).parent / "data" / "golden"
# The golden models live on this device: RELPROP_TEST_DEVICE=cuda runs the golden and explainer
# tests on a GPU (CI has none; a GPU machine checks the same numbers there).
DEVICE = torch.device(os.environ.get("RELPROP_TEST_DEVICE", "cpu"))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a gzipped idx (uint8) file, the Fashion-MNIST distribution format."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(root: Path, labels: np.ndarray, min_half: int, half_steps: int,
                             min_intensity: int) -> Path:
    """A Fashion-MNIST folder (train and t10k alike) of bright 28x28 blobs of varied size."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for i in range(len(labels)):
            half = min_half + i % half_steps
            images[i, 14 - half:14 + half, 14 - half // 2:14 + half // 2] = rng.integers(min_intensity, 256)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _fashion_mnist_installed() -> bool:
    from relprop.datasets import load_split

    try:
        load_split("test")
    except FileNotFoundError:
        return False
    return True


# ./run and CI install the data, so these run there; elsewhere the reason says how to get it.
needs_real_data = pytest.mark.skipif(
    not _fashion_mnist_installed(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or set $RELPROP_FASHION_MNIST)",
)


def golden_file(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / name))


def hf_folder(tmp_path_factory, fixture: str) -> Path:
    folder = tmp_path_factory.mktemp(fixture)
    shutil.copy(GOLDEN / f"{fixture}.hf_config.json", folder / "config.json")
    shutil.copy(GOLDEN / f"{fixture}.hf.safetensors", folder / "model.safetensors")
    return folder


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory) -> Path:
    folder = hf_folder(tmp_path_factory, "vit_small")
    (folder / "preprocessor_config.json").write_text(
        '{"image_processor_type": "ViTImageProcessor", "do_resize": true, "size": {"height": 224, "width": 224},'
        ' "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true,'
        ' "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}')
    return folder


@pytest.fixture(scope="session")
def vit_model(vit_folder):
    from transformers import ViTForImageClassification
    return ViTForImageClassification.from_pretrained(vit_folder, attn_implementation="eager").eval().to(DEVICE)


@pytest.fixture(scope="session")
def vit_inputs():
    inputs = golden_file("vit_small.inputs.safetensors")
    inputs["pixel_values"] = (inputs["images_u8"].float() / 255 - 0.5) / 0.5
    return inputs


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory, "bert_small")


@pytest.fixture(scope="session")
def bert_model(bert_folder):
    from transformers import BertForSequenceClassification
    return BertForSequenceClassification.from_pretrained(bert_folder, attn_implementation="eager").eval().to(DEVICE)


@pytest.fixture(scope="session")
def bert_inputs():
    return golden_file("bert_small.inputs.safetensors")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected| (the golden README's measure)."""
    actual, expected = actual.detach().cpu().double().flatten(), expected.detach().cpu().double().flatten()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="session")
def timm_style_vit():
    from tests.timm_style import VisionTransformer
    model = VisionTransformer()
    model.load_state_dict(golden_file("vit_small.weights.safetensors"))
    return model.eval().to(DEVICE)


SRC = Path(__file__).resolve().parent.parent / "src"


def _relprop_command(args, env=None):
    import sys

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   **(env or {})}
    environment.pop("RELPROP_DEBUG", None)
    return [sys.executable, "-m", "relprop", *map(str, args)], environment


def run_relprop(*args, cwd=None, timeout=600, env=None, stdin=None):
    """Run the real ``relprop`` command (``python -m relprop``) in a subprocess, with this
    checkout's sources first on the path and the Hub offline."""
    import subprocess

    command, environment = _relprop_command(args, env)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
                          input=stdin)


def run_relprop_many(commands, timeout=600):
    """`run_relprop` for each argument list in ``commands``, several at a time (each process
    spends most of its time importing torch); results in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run_relprop(*args, timeout=timeout), commands))


def assert_cli_error(result, code: int, *phrases: str) -> str:
    """The command failed with ``code``, its stderr names every phrase, and nothing printed a
    traceback; returns stderr."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == code, (result.returncode, output)
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    return result.stderr


def load_script(path: Path):
    """A script outside the package (benchmarks/, scripts/) imported as a module by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
