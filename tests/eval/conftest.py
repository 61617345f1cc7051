"""Fixtures for the benchmark tests: a tiny random ViT, a fake explainer and small on-disk
datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_fakes import FakeExplainer, make_tiny_vit, random_image


@pytest.fixture
def tiny_vit():
    # One thread: the model is tiny and the test machine's cores are shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_tiny_vit()
    torch.set_num_threads(previous)


@pytest.fixture
def fake_explainer(tiny_vit):
    return FakeExplainer(tiny_vit)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """root/<class>/<image>: classes a, b, c with two images each, one corrupt JPEG in b
    and a stray text file (ignored)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for k in range(2):
            random_image(rng).save(root / name / f"img{k}.png")
    (root / "b" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "c" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def mask_folder(tmp_path) -> Path:
    """root/images + root/masks: three good pairs and one truncated image."""
    rng = np.random.default_rng(1)
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(3):
        random_image(rng).save(root / "images" / f"s{k}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[5 + k : 30, 10 : 35 - k] = 255
        Image.fromarray(mask).save(root / "masks" / f"s{k}.png")
    good = (root / "images" / "s0.png").read_bytes()
    (root / "images" / "s9.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "s9.png")
    return root
