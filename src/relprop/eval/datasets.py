"""Readers for the benchmark data. Listing is cheap; decoding happens in ``load()`` so a
corrupt file fails on its own sample, where the runner reports and skips it.

* ``image_folder``: ImageNet-style ``root/<class_dir>/<image>`` (perturbation test).
* ``mat_segmentation``: the ImageNet-segmentation file ``gtsegs_ijcv.mat`` (MATLAB v7.3).
* ``mask_folder``: ``root/images/NAME.ext`` with ``root/masks/NAME.png`` (mask > 0 is
  foreground, same size as the image), for your own segmentation data.

A dataset that lists no sample is an ``InputError``. Each sample names the files it is read
from (``sources``), which the run folder's data fingerprint is made of.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Protocol
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

# torchvision's ImageFolder extensions, matched case-insensitively (ImageNet uses .JPEG).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})


def _read_rgb(path: Path) -> Image.Image:
    # convert() forces a full decode, so truncated files fail here and not later.
    with Image.open(path) as image:
        return image.convert("RGB")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


class Labelled(Protocol):
    """A classification sample as the perturbation benchmark reads it (`LabelledImage`,
    `fashion.CanvasImage`)."""

    @property
    def id(self) -> str: ...

    @property
    def label(self) -> int: ...

    def load(self) -> Image.Image: ...


@dataclass(frozen=True)
class LabelledImage:
    """One classification sample; ``id`` is its path relative to the dataset root."""

    id: str
    path: Path
    label: int

    @property
    def sources(self) -> tuple[Path, ...]:
        return (self.path,)

    def load(self) -> Image.Image:
        return _read_rgb(self.path)


@dataclass(frozen=True)
class SegmentationSample:
    """One segmentation sample; ``load()`` returns the RGB image and its mask (H, W)."""

    id: str
    loader: Callable[[], tuple[Image.Image, np.ndarray]] = field(repr=False, compare=False)
    sources: tuple[Path, ...] = field(default=(), repr=False, compare=False)  # files the loader reads

    def load(self) -> tuple[Image.Image, np.ndarray]:
        return self.loader()


def read_label_map(path: str | Path) -> dict[str, int]:
    """Folder name -> class index, from a JSON object or a text file with one name per line
    (index = line number, e.g. the 1000 ImageNet synsets in model order)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() != ".json":
            names = [line.strip() for line in text.splitlines() if line.strip()]
            return {name: index for index, name in enumerate(names)}
        return {str(k): int(v) for k, v in json.loads(text).items()}
    except OSError as error:
        raise InputError(f"cannot read the label map {str(path)!r}: {error.strerror or error}") from None
    except (ValueError, AttributeError, TypeError) as error:
        raise InputError(f"label map {str(path)!r} is not a JSON object {{folder: class index}}: {error}") from None


def image_folder(root: str | Path, label_map: Mapping[str, int] | None = None) -> list[LabelledImage]:
    """Samples of ``root/<class_dir>/**/<image>`` in sorted order.

    Without ``label_map`` the class index is the position of the folder among the sorted
    folder names (torchvision's ImageFolder rule, which gives the standard ImageNet indices
    only when all 1000 synset folders are present).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if label_map is None:
        label_map = {d.name: i for i, d in enumerate(class_dirs)}
    unmapped = [d.name for d in class_dirs if d.name not in label_map]
    if unmapped:
        raise InputError(f"{len(unmapped)} class folders missing from the label map, e.g. {unmapped[:5]}")
    samples = []
    for class_dir in class_dirs:
        for path in sorted(p for p in class_dir.rglob("*") if _is_image(p)):
            samples.append(LabelledImage(path.relative_to(root).as_posix(), path, label_map[class_dir.name]))
    if not samples:
        expected = f"expected {root}/<class>/<image>"
        if any(_is_image(p) for p in root.iterdir()):
            raise InputError(f"no images in the class folders of {root}: {expected}, one folder per class")
        raise InputError(f"no images in {root}: {expected} ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples


class _MatReader:
    """Lazily opened handle on ``gtsegs_ijcv.mat``, shared by its samples."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def _open(self):
        if self._file is None:
            try:
                import h5py  # optional dependency (relprop[eval])
            except ImportError:
                raise InputError(f"reading {self.path.name} needs h5py: pip install h5py") from None
            self._file = h5py.File(self.path, "r")
        return self._file

    def __len__(self) -> int:
        return len(self._open()["/value/img"])

    def __call__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        f = self._open()
        # MATLAB stores arrays column-major, so h5py sees them transposed: the image as
        # (3, W, H) and the mask as (W, H). /value/gt holds, per image, a reference to a
        # 1x1 cell whose entry references the mask.
        image = np.asarray(f[f["/value/img"][index, 0]]).transpose(2, 1, 0)
        cell = f[f["/value/gt"][index, 0]]
        mask = np.asarray(f[cell[0, 0]]).transpose(1, 0)
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB"), mask


def mat_segmentation(path: str | Path) -> list[SegmentationSample]:
    """Samples of the ImageNet-segmentation ``.mat`` file; ids are the image indices."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation file not found: {path}")
    reader = _MatReader(path)
    try:
        n = len(reader)
    except (OSError, KeyError) as error:
        raise InputError(f"{path} is not a MATLAB v7.3 (HDF5) file with /value/img and /value/gt: {error}") from None
    if n == 0:
        raise InputError(f"no images in {path}")
    return [SegmentationSample(str(i), partial(reader, i), (path,)) for i in range(n)]


def mask_folder(root: str | Path) -> list[SegmentationSample]:
    """Samples of ``root/images/NAME.ext`` with masks ``root/masks/NAME.<ext>`` (mask > 0 is
    foreground; any image extension, PNG recommended). An image without a mask fails at
    load time so that it is reported, not dropped."""
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"expected the folders {images_dir} and {masks_dir} (masks: same name, any image type)")
    masks: dict[str, Path] = {}
    for mask in sorted(p for p in masks_dir.iterdir() if _is_image(p)):
        if mask.stem in masks:
            raise InputError(f"two masks for {mask.stem!r}: {masks[mask.stem].name}, {mask.name}")
        masks[mask.stem] = mask

    def loader(image_path: Path) -> tuple[Image.Image, np.ndarray]:
        mask_path = masks.get(image_path.stem)
        if mask_path is None:
            raise FileNotFoundError(f"no mask for {image_path.name} in {masks_dir}")
        with Image.open(mask_path) as mask:
            # An alpha channel is not part of the label (opaque would read as foreground).
            if mask.mode in ("RGBA", "LA"):
                mask = mask.convert(mask.mode[:-1])
            return _read_rgb(image_path), np.array(mask)

    samples = [SegmentationSample(p.name, partial(loader, p), (p, *([masks[p.stem]] if p.stem in masks else [])))
               for p in sorted(p for p in images_dir.iterdir() if _is_image(p))]
    if not samples:
        raise InputError(f"no images in {images_dir} (one of {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples
