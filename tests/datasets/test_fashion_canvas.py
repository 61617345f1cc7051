"""Tests of the Fashion-MNIST idx reader and the cluttered-canvas generator."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from relprop.datasets import (
    CLASS_NAMES,
    CanvasConfig,
    FashionCanvasDataset,
    FashionPairDataset,
    load_split,
    make_canvas,
    make_pair_canvas,
    read_idx,
)
from relprop.datasets.fashion_canvas import resolve_root
from tests.conftest import needs_real_data, write_fake_fashion_mnist, write_idx


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake Fashion-MNIST folder: 40 items per split, one class per 4 items, blobs of varied size."""
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), np.arange(40) // 4, 4, 9, 80)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x-idx3-ubyte.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), array)
    raw = tmp_path / "y-idx1-ubyte"
    raw.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 8, 9]))
    np.testing.assert_array_equal(read_idx(raw), [7, 8, 9])


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "magic"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00", "unsupported"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x00", "holds"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x05", "truncated"),
])
def test_read_idx_rejects_bad_files(tmp_path: Path, payload: bytes, message: str) -> None:
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad")


def test_missing_data_error_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_split("train", root=tmp_path)


def test_root_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RELPROP_FASHION_MNIST", raising=False)
    assert resolve_root() == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv("RELPROP_FASHION_MNIST", str(tmp_path))
    assert resolve_root() == tmp_path
    assert resolve_root("/elsewhere") == Path("/elsewhere")


def test_load_split_on_tiny_files(tiny_root: Path) -> None:
    images, labels = load_split("test", tiny_root)
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (40,) and set(labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        load_split("validation", tiny_root)


def test_canvas_types_shapes_and_mask(tiny_root: Path) -> None:
    image, mask, label = make_canvas("train", 5, root=tiny_root)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.bool_
    assert isinstance(label, int) and label == 1
    assert np.array_equal(image[..., 0], image[..., 2])  # grey replicated to RGB
    assert mask.any() and not mask.all()
    # The item is pasted opaquely at >= 0.8 intensity, clutter at <= 0.6: the mask is brighter.
    assert image[mask, 0].mean() > image[~mask, 0].mean() + 40


def test_canvas_is_deterministic_and_seed_dependent(tiny_root: Path) -> None:
    a, b = make_canvas("test", 3, seed=7, root=tiny_root), make_canvas("test", 3, seed=7, root=tiny_root)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], make_canvas("test", 3, seed=8, root=tiny_root)[0])
    assert not np.array_equal(a[0], make_canvas("train", 3, seed=7, root=tiny_root)[0])


def test_canvas_config_is_honoured(tiny_root: Path) -> None:
    config = CanvasConfig(size=48, item_size=(20, 20), pair_item_size=(20, 24),
                          n_fragments=(0, 0), noise_std=0.0)
    image, mask, _ = make_canvas("test", 39, config=config, root=tiny_root)
    assert image.shape == (48, 48, 3)
    assert not image[~mask].any()  # no clutter, no noise: only the item is lit
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert np.ptp(rows) < 20 and np.ptp(cols) < 20
    with pytest.raises(ValueError, match="fit"):
        CanvasConfig(size=32, item_size=(24, 40))


def test_index_out_of_range(tiny_root: Path) -> None:
    with pytest.raises(IndexError):
        make_canvas("test", 40, root=tiny_root)
    with pytest.raises(IndexError):
        FashionCanvasDataset("test", root=tiny_root, length=10)[10]


def test_pair_canvas_has_two_classes_and_disjoint_masks(tiny_root: Path) -> None:
    for index in range(0, 40, 3):
        image, (mask_a, mask_b), (label_a, label_b) = make_pair_canvas("test", index, root=tiny_root)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert label_a == index // 4 and label_a != label_b
        assert mask_a.dtype == mask_b.dtype == np.bool_
        assert mask_a.any() and mask_b.any() and not (mask_a & mask_b).any()
    again = make_pair_canvas("test", 0, root=tiny_root)
    np.testing.assert_array_equal(again[0], make_pair_canvas("test", 0, root=tiny_root)[0])


def test_datasets_index_like_the_functions(tiny_root: Path) -> None:
    single = FashionCanvasDataset("train", seed=2, root=tiny_root)
    assert len(single) == 40
    np.testing.assert_array_equal(single[-1][0], make_canvas("train", 39, seed=2, root=tiny_root)[0])
    pairs = FashionPairDataset("test", root=tiny_root, length=12)
    assert len(pairs) == 12
    assert pairs[4][2] == make_pair_canvas("test", 4, root=tiny_root)[2]


@needs_real_data
def test_real_data_split_sizes() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_split(split)
        assert images.shape == (n, 28, 28) and labels.shape == (n,)
        assert np.bincount(labels).tolist() == [n // 10] * len(CLASS_NAMES)


@needs_real_data
def test_real_canvas_fixed_fingerprint() -> None:
    """Pins the generator: a change here silently changes every published benchmark number."""
    image, mask, label = make_canvas("test", 0)
    assert label == 9  # Ankle boot, the first t10k item
    assert (int(image.astype(np.int64).sum()), int(mask.sum())) == (269133, 408)


@needs_real_data
def test_real_canvases_are_fast() -> None:
    import time

    start = time.perf_counter()
    for index in range(500):
        make_canvas("test", index)
    assert time.perf_counter() - start < 5.0  # ~1 ms each on a slow core

