import json

import numpy as np
import pytest
import torch
from PIL import Image

from relprop.eval import datasets
from relprop.eval.datasets import mat_segmentation, read_label_map
from relprop.eval.images import Normalization, mask_to_tensor, to_unit_tensor

from eval_fakes import write_gtsegs_mat


def test_mat_reader_undoes_matlab_layout(tmp_path):
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), (rng.random((5, 7)) > 0.5).astype(np.uint8))
             for _ in range(3)]
    path = tmp_path / "gtsegs_ijcv.mat"
    pytest.importorskip("h5py")
    write_gtsegs_mat(path, items)
    samples = mat_segmentation(path)
    assert [s.id for s in samples] == ["0", "1", "2"]
    for sample, (image, mask) in zip(samples, items):
        got_image, got_mask = sample.load()
        assert got_image.mode == "RGB" and got_image.size == (7, 5)  # PIL size is (W, H)
        np.testing.assert_array_equal(np.asarray(got_image), image)
        np.testing.assert_array_equal(got_mask, mask)


def test_mat_reader_rejects_other_files(tmp_path):
    path = tmp_path / "old.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(ValueError, match="v7.3"):
        mat_segmentation(path)


def test_image_folder_sorted_labels_and_label_maps(image_folder, tmp_path):
    samples = datasets.image_folder(image_folder)
    ids = [s.id for s in samples]
    # sorted classes and files; the corrupt JPEG is listed (it fails at load), notes.txt is not
    assert ids == ["a/img0.png", "a/img1.png", "b/broken.JPEG", "b/img0.png", "b/img1.png",
                   "c/img0.png", "c/img1.png"]
    assert [s.label for s in samples] == [0, 0, 1, 1, 1, 2, 2]

    json_map = tmp_path / "labels.json"
    json_map.write_text(json.dumps({"a": 7, "b": 3, "c": 0}))
    assert {s.label for s in datasets.image_folder(image_folder, read_label_map(json_map)) if s.id[0] == "a"} == {7}
    txt_map = tmp_path / "synsets.txt"
    txt_map.write_text("c\nb\na\nz\n")  # index = line number
    assert read_label_map(txt_map) == {"c": 0, "b": 1, "a": 2, "z": 3}
    with pytest.raises(ValueError, match="missing from the label map"):
        datasets.image_folder(image_folder, {"a": 0, "b": 1})


def test_mask_folder_pairs_images_and_masks(mask_folder):
    samples = datasets.mask_folder(mask_folder)
    assert [s.id for s in samples] == ["s0.png", "s1.png", "s2.png", "s9.png"]
    image, mask = samples[1].load()
    assert image.size == (48, 40) and mask.shape == (40, 48) and mask.max() == 255
    with pytest.raises(OSError):
        samples[3].load()  # truncated image


def test_mask_folder_reports_missing_mask_and_ignores_alpha(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "x.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "y.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255  # opaque but black: background everywhere
    rgba[0, 0, 0] = 9
    Image.fromarray(rgba).save(tmp_path / "masks" / "x.png")
    x, y = datasets.mask_folder(tmp_path)
    assert mask_to_tensor(x.load()[1], (4, 4)).sum() == 1
    with pytest.raises(FileNotFoundError, match="no mask"):
        y.load()


def test_preprocessing_matches_resize_to_tensor_normalize():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    x = to_unit_tensor(Image.fromarray(array), (2, 3))  # same size: no interpolation
    assert x.shape == (3, 2, 3)
    assert torch.allclose(x, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert torch.allclose(Normalization()(x[None])[0], x * 2 - 1)  # mean = std = 0.5
    assert to_unit_tensor(Image.fromarray(array), (8, 5)).shape == (3, 8, 5)
    # nearest-neighbour mask resize keeps it binary
    mask = mask_to_tensor(np.array([[0, 3], [0, 0]]), (4, 4))
    assert mask.dtype == torch.bool and mask.sum() == 4 and mask[0, 3]
