"""Cluttered Fashion-MNIST canvases with pixel-exact ground-truth masks.

Each canvas holds one Fashion-MNIST item pasted at a random position and scale
on a background of dimmed fragments of *other-class* items plus Gaussian noise.
The item's pixel mask is the ground truth for localisation metrics; pair
canvases (two items of different classes) serve class-specificity metrics.

Every canvas is a pure function of ``(split, index, seed, config)``: the random
generator is seeded from exactly those values, so item ``i`` is bit-identical
across runs and machines (given the same numpy/Pillow resampling code).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV_VAR = "RELPROP_FASHION_MNIST"
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# Separate random streams so a pair canvas never replays a single canvas.
_STREAM_SINGLE, _STREAM_PAIR = 0, 1

Canvas = tuple[np.ndarray, np.ndarray, int]
PairCanvas = tuple[np.ndarray, tuple[np.ndarray, np.ndarray], tuple[int, int]]


# --------------------------------------------------------------------- idx I/O
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes, the MNIST format."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: idx element type 0x{data[2]:02x} unsupported (only uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """Dataset folder: explicit ``root``, else $RELPROP_FASHION_MNIST, else the Debian path."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENV_VAR, DEFAULT_ROOT))


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (images N x 28 x 28 uint8, labels N uint8) of a Fashion-MNIST split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _load_cached(str(resolve_root(root)), split)


def split_files(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (images, labels) idx files of a split, which every canvas of the split is made from."""
    prefix = _FILE_PREFIX[split]
    folder = resolve_root(root)
    return folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"


@lru_cache(maxsize=4)
def _load_cached(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = split_files(split, root)
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass root=... / set "
            f"${ROOT_ENV_VAR} to a folder holding the four *-ubyte.gz files."
        )
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"inconsistent idx files: images {images.shape}, labels {labels.shape}")
    return images, labels


# ------------------------------------------------------------------ canvases
@dataclass(frozen=True)
class CanvasConfig:
    """Geometry and clutter strength of the canvases; ranges are inclusive."""

    size: int = 64
    item_size: tuple[int, int] = (32, 44)       # side of the resized 28x28 main item
    pair_item_size: tuple[int, int] = (32, 32)  # per item on pair canvases; <= size // 2
    item_intensity: tuple[float, float] = (0.8, 1.0)
    n_fragments: tuple[int, int] = (2, 5)
    fragment_crop: tuple[int, int] = (10, 18)    # side of the crop taken from a 28x28 item
    fragment_scale: tuple[float, float] = (0.8, 1.5)
    fragment_intensity: tuple[float, float] = (0.1, 0.3)
    noise_std: float = 10.0                      # Gaussian noise over the whole canvas, in u8 units
    mask_threshold: int = 20                     # resized item pixels above this form the mask

    def __post_init__(self) -> None:
        if self.item_size[1] > self.size or self.pair_item_size[1] > self.size // 2:
            raise ValueError("items must fit the canvas (pair items in half of it)")


def _rng(seed: int, split: str, index: int, n_items: int, stream: int) -> np.random.Generator:
    if not 0 <= index < n_items:
        raise IndexError(f"index {index} out of range for the {n_items} {split} items")
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _uniform_int(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _other_item(rng: np.random.Generator, labels: np.ndarray, exclude: set[int]) -> int:
    """Random item whose class is not in ``exclude`` (rejection sampling, >= 80% hit rate)."""
    while True:
        j = int(rng.integers(len(labels)))
        if int(labels[j]) not in exclude:
            return j


def _fragment(rng: np.random.Generator, item: np.ndarray, cfg: CanvasConfig) -> np.ndarray:
    """Dimmed, rescaled crop of ``item`` centred on its outline, so it shows shape, not a flat patch."""
    h, w = _uniform_int(rng, cfg.fragment_crop), _uniform_int(rng, cfg.fragment_crop)
    lit = item > cfg.mask_threshold
    outline = lit.copy()
    outline[1:-1, 1:-1] &= ~(lit[:-2, 1:-1] & lit[2:, 1:-1] & lit[1:-1, :-2] & lit[1:-1, 2:])
    candidates = np.flatnonzero(outline)
    cy, cx = divmod(int(rng.choice(candidates)), item.shape[1]) if len(candidates) else (14, 14)
    y0 = min(max(cy - h // 2, 0), item.shape[0] - h)
    x0 = min(max(cx - w // 2, 0), item.shape[1] - w)
    scale = rng.uniform(*cfg.fragment_scale)
    crop = _resize(item[y0:y0 + h, x0:x0 + w], round(w * scale), round(h * scale))
    return crop.astype(np.float32) * rng.uniform(*cfg.fragment_intensity)


def _background(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                exclude: set[int], cfg: CanvasConfig) -> np.ndarray:
    """Float canvas of other-class fragments, overlaid with max so none hides another."""
    canvas = np.zeros((cfg.size, cfg.size), np.float32)
    for _ in range(_uniform_int(rng, cfg.n_fragments)):
        frag = _fragment(rng, images[_other_item(rng, labels, exclude)], cfg)
        fh, fw = frag.shape
        y, x = int(rng.integers(cfg.size - fh + 1)), int(rng.integers(cfg.size - fw + 1))
        np.maximum(canvas[y:y + fh, x:x + fw], frag, out=canvas[y:y + fh, x:x + fw])
    return canvas


def _paste(rng: np.random.Generator, canvas: np.ndarray, item: np.ndarray, side: int,
           y: int, x: int, cfg: CanvasConfig) -> np.ndarray:
    """Paste the resized item opaquely over its mask; return the canvas-sized mask."""
    resized = _resize(item, side, side)
    item_mask = resized > cfg.mask_threshold
    region = canvas[y:y + side, x:x + side]
    region[item_mask] = resized[item_mask] * rng.uniform(*cfg.item_intensity)
    mask = np.zeros(canvas.shape, bool)
    mask[y:y + side, x:x + side] = item_mask
    return mask


def _finish(rng: np.random.Generator, canvas: np.ndarray, cfg: CanvasConfig) -> np.ndarray:
    """Add noise everywhere (the item too, so it is not a noise-free give-away) -> RGB uint8."""
    canvas = canvas + rng.normal(0.0, cfg.noise_std, canvas.shape).astype(np.float32)
    grey = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def make_canvas(split: str, index: int, seed: int = 0, config: CanvasConfig = CanvasConfig(),
                root: str | os.PathLike | None = None) -> Canvas:
    """Canvas of item ``index`` of ``split``: (image HxWx3 uint8, mask HxW bool, label)."""
    images, labels = load_split(split, root)
    rng, cfg = _rng(seed, split, index, len(labels), _STREAM_SINGLE), config
    label = int(labels[index])
    canvas = _background(rng, images, labels, {label}, cfg)
    side = _uniform_int(rng, cfg.item_size)
    y, x = int(rng.integers(cfg.size - side + 1)), int(rng.integers(cfg.size - side + 1))
    mask = _paste(rng, canvas, images[index], side, y, x, cfg)
    return _finish(rng, canvas, cfg), mask, label


def make_pair_canvas(split: str, index: int, seed: int = 0, config: CanvasConfig = CanvasConfig(),
                     root: str | os.PathLike | None = None) -> PairCanvas:
    """Item ``index`` plus a random item of another class, each in its own canvas half.

    Returns (image, (mask_a, mask_b), (label_a, label_b)); the halves make the masks disjoint.
    """
    images, labels = load_split(split, root)
    rng, cfg = _rng(seed, split, index, len(labels), _STREAM_PAIR), config
    label_a = int(labels[index])
    other = _other_item(rng, labels, {label_a})
    label_b = int(labels[other])
    canvas = _background(rng, images, labels, {label_a, label_b}, cfg)
    vertical_split = bool(rng.integers(2))  # halves side by side (True) or stacked
    first_half = int(rng.integers(2))       # which half item a goes to
    half = cfg.size // 2
    masks = []
    for slot, item in enumerate((images[index], images[other])):
        side = _uniform_int(rng, cfg.pair_item_size)
        along = int(rng.integers(half - side + 1)) + half * (slot != first_half)
        across = int(rng.integers(cfg.size - side + 1))
        y, x = (across, along) if vertical_split else (along, across)
        masks.append(_paste(rng, canvas, item, side, y, x, cfg))
    return _finish(rng, canvas, cfg), (masks[0], masks[1]), (label_a, label_b)


class FashionCanvasDataset:
    """Indexable collection of single-item canvases; items are (image, mask, label).

    Duck-types ``torch.utils.data.Dataset`` (``__len__``/``__getitem__``), so it works with
    a DataLoader without making torch a requirement of data generation.
    """

    def __init__(self, split: str = "test", seed: int = 0, config: CanvasConfig = CanvasConfig(),
                 root: str | os.PathLike | None = None, length: int | None = None) -> None:
        n_items = len(load_split(split, root)[1])  # fail early if the data are missing
        if length is not None and not 0 <= length <= n_items:
            raise ValueError(f"length must be in [0, {n_items}], got {length}")
        self.split, self.seed, self.config, self.root = split, seed, config, root
        self.length = n_items if length is None else length

    def __len__(self) -> int:
        return self.length

    def _check(self, index: int) -> int:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} canvases")
        return index % self.length

    def __getitem__(self, index: int) -> Canvas:
        return make_canvas(self.split, self._check(index), self.seed, self.config, self.root)


class FashionPairDataset(FashionCanvasDataset):
    """Two-class canvases; items are (image, (mask_a, mask_b), (label_a, label_b))."""

    def __getitem__(self, index: int) -> PairCanvas:  # type: ignore[override]
        return make_pair_canvas(self.split, self._check(index), self.seed, self.config, self.root)
