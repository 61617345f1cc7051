"""Weak-localisation benchmark (``relprop eval localization``): how well a map, turned into a
mask and a box (``relprop.localize``), finds the object.

Data: cluttered Fashion-MNIST canvases with pixel-exact item masks: single-item canvases
(``test/<seed>/<index>``) and two-item canvases (``pair/test/<seed>/<index>``, items of two
classes). Every item is localised from the map **of its own (true) class**, so on a pair each
item is localised from the explanation of its class while the other item is clutter; on
single canvases that is the usual "ground-truth class known" protocol. Maps are bilinearly
upsampled to the image as in the other benchmarks.

Per item and threshold (``mean`` — the paper's segmentation rule —, ``otsu``, ``mass:P``):
CorLoc hit (box of the mask's largest 8-connected component vs the item mask's tight box, IoU
>= 0.5), mask IoU and box IoU; per item, the pointing-game hit (the map's maximum on the
item's mask). Summary per row and canvas kind: CorLoc and pointing as % of items, mean mask IoU.

Rows for orientation (``baselines``): ``centre_box`` — the centred box of half the image's
height and width (its mask is the box; it points at the centre pixel), the same for every
threshold —, and ``random_map`` — a uniform random map on the model's patch grid (seeded by
the sample id and item), upsampled and thresholded like the methods' maps.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from relprop.datasets.fashion_canvas import make_canvas

from ..errors import UsageError
from ..files import atomic_write_text
from ..localize import THRESHOLDS, box_iou, mask_box, mask_iou, parse_threshold, score_localization
from . import fashion
from .args import add_model_data, fashion_data, load_vision, provenance
from .images import Normalization, checked_mask, mask_to_tensor, to_unit_tensor
from .runner import Benchmark, Explain, Failure, model_device, register_benchmark, report_non_finite

TABLE_FILE = "localization.md"
CENTRE_BOX = "centre_box"
RANDOM_MAP = "random_map"
DEFAULT_THRESHOLDS = ("mean", "otsu", "mass:50")


@dataclass(frozen=True)
class LocalizationConfig:
    image_size: tuple[int, int] = (224, 224)
    normalization: Normalization = Normalization()
    thresholds: tuple[str, ...] = DEFAULT_THRESHOLDS
    region: str = "largest"
    patch_grid: tuple[int, int] = (14, 14)          # of the random-map baseline
    centre_fraction: float = 0.5                     # side of the centre box / side of the image

    def __post_init__(self) -> None:
        for threshold in self.thresholds:
            parse_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored


@dataclass(frozen=True)
class LocalizationSample:
    """A single-item or two-item canvas; ``load()`` -> (image, [(item mask, item class), ...])."""

    id: str
    canvas: fashion.CanvasImage | fashion.PairSample

    @property
    def pair(self) -> bool:
        return isinstance(self.canvas, fashion.PairSample)

    @property
    def sources(self) -> tuple[Path, ...]:
        return self.canvas.sources

    def load(self) -> tuple[Image.Image, list[tuple[np.ndarray, int]]]:
        if isinstance(self.canvas, fashion.PairSample):
            image, masks, labels = self.canvas.load()
            return image, [(masks[0], int(labels[0])), (masks[1], int(labels[1]))]
        c = self.canvas
        pixels, mask, label = make_canvas(c.split, c.index, c.seed, c.config, c.root)
        return Image.fromarray(pixels), [(mask, int(label))]


def localization_samples(n: int | None, pairs: int | None, split: str = "test", seed: int = 0,
                         root: str | os.PathLike | None = None) -> list[LocalizationSample]:
    """The first ``n`` single canvases and the first ``pairs`` pair canvases (all when None)."""
    return ([LocalizationSample(s.id, s) for s in fashion.canvas_images(n, split, seed, root=root)]
            + [LocalizationSample(f"pair/{s.id}", s) for s in fashion.pair_samples(pairs, split, seed, root=root)])


def centre_box(image_size: tuple[int, int], fraction: float) -> tuple[int, int, int, int]:
    height, width = image_size
    bh, bw = max(1, round(height * fraction)), max(1, round(width * fraction))
    y0, x0 = (height - bh) // 2, (width - bw) // 2
    return x0, y0, x0 + bw, y0 + bh


def centre_scores(truth: torch.Tensor, config: LocalizationConfig) -> dict[str, Any]:
    """Scores of the centre-box row for one item (the same under every threshold)."""
    truth_np = truth.cpu().numpy().astype(bool)
    height, width = truth_np.shape
    box = centre_box((height, width), config.centre_fraction)
    mask = np.zeros_like(truth_np)
    mask[box[1]:box[3], box[0]:box[2]] = True
    truth_box = mask_box(truth_np, "tight")
    assert truth_box is not None, "items have non-empty masks (checked on load)"
    iou = box_iou(box, truth_box)
    entry = {"corloc": iou >= 0.5, "box_iou": iou, "mask_iou": mask_iou(mask, truth_np)}
    return {"pointing": bool(truth_np[height // 2, width // 2]), **{t: dict(entry) for t in config.thresholds}}


def random_map(sample_id: str, item: int, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """A uniform random patch map, fixed by (sample id, item), bilinearly upsampled to ``size``."""
    rng = np.random.default_rng([zlib.crc32(sample_id.encode()), item])
    patches = torch.from_numpy(rng.random(grid, dtype=np.float32))
    return F.interpolate(patches[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _load(sample: LocalizationSample, config: LocalizationConfig):
    image, items = sample.load()
    size = config.image_size
    loaded = [(mask_to_tensor(checked_mask(mask, image), size), label) for mask, label in items]
    if any(not mask.any() for mask, _ in loaded):
        raise ValueError("an item mask is empty at the model's input size")
    return to_unit_tensor(image, size), loaded


@register_benchmark
class LocalizationBenchmark(Benchmark):
    """One record per sample and row: the scores of each item (one on single canvases, two on pairs)."""

    name = "localization"
    help = "weak localisation: CorLoc, pointing game and mask IoU of each map's mask and box"
    description = ("Threshold each item's map (its own class) into a mask, box the mask's largest connected "
                   "component, and score box (CorLoc, IoU >= 0.5), maximum (pointing game) and mask (IoU) "
                   "against the item on single- and two-item Fashion-MNIST canvases.")
    baselines = (CENTRE_BOX, RANDOM_MAP)

    def __init__(self, model: torch.nn.Module, samples: Sequence[LocalizationSample],
                 config: LocalizationConfig = LocalizationConfig(), identity: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None):
        super().__init__(model, samples, config, identity, provenance)
        self.device = model_device(model)

    def load(self, sample: LocalizationSample):
        return _load(sample, self.config)

    def collate(self, samples: list[Any], loaded: list[Any]) -> Any:
        return samples, loaded, torch.stack([image for image, _ in loaded]).to(self.device)

    def records(self, explain: Explain, method: str, batch: Any, needs: list[list[tuple]],
                failures: list[Failure]) -> list[dict]:
        samples, loaded, images = batch
        rows = [i for i, keys in enumerate(needs) if keys]
        # one explanation pass per item position: first items of all rows, then second items of pairs
        maps: dict[tuple[int, int], torch.Tensor] = {}
        for item in range(max(len(loaded[i][1]) for i in rows)):
            which = [i for i in rows if item < len(loaded[i][1])]
            idx = torch.tensor(which, device=self.device)
            target = torch.tensor([loaded[i][1][item][1] for i in which], device=self.device)
            result = explain(self.config.normalization(images[idx]), target=target)
            upsampled = result.upsampled(size=self.config.image_size).detach().cpu()
            for j, i in enumerate(which):
                maps[(i, item)] = upsampled[j]
        records = []
        for i in rows:
            item_maps = [maps[(i, k)] for k in range(len(loaded[i][1]))]
            if not all(torch.isfinite(m).all() for m in item_maps):
                report_non_finite(failures, samples[i].id, method)
                continue
            records.append(self._record(method, samples[i], loaded[i][1], item_maps))
        return records

    def baseline_records(self, name: str, batch: Any, needs: list[list[tuple]],
                         failures: list[Failure]) -> list[dict]:
        samples, loaded, _ = batch
        records = []
        for i in (i for i, keys in enumerate(needs) if keys):
            items = loaded[i][1]
            if name == CENTRE_BOX:
                scores = [centre_scores(mask, self.config) for mask, _ in items]
                records.append(self._stamp(name, samples[i], items, scores))
            else:
                item_maps = [random_map(samples[i].id, k, self.config.patch_grid, self.config.image_size)
                             for k in range(len(items))]
                records.append(self._record(name, samples[i], items, item_maps))
        return records

    def _record(self, row: str, sample: Any, items: list, maps: list[torch.Tensor]) -> dict:
        scores = [score_localization(m, mask, self.config.thresholds, self.config.region)
                  for m, (mask, _) in zip(maps, items)]
        return self._stamp(row, sample, items, scores)

    @staticmethod
    def _stamp(row: str, sample: Any, items: list, scores: list[dict]) -> dict:
        return {"method": row, "id": sample.id, "kind": "pair" if sample.pair else "single",
                "labels": [label for _, label in items], "items": scores}

    def summarise(self, records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        return summarise_localization(records, ids, methods, cfg, self.config.thresholds)

    def report_files(self) -> tuple[str, ...]:
        return (TABLE_FILE,)

    def write_reports(self, summary: Mapping[str, Any], folder: Path) -> None:
        atomic_write_text(folder / TABLE_FILE, markdown_tables(summary) + "\n")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_data(parser)
        parser.add_argument("--format", choices=["fashion"], default="fashion",
                            help="fashion: single- and two-item canvases of the Fashion-MNIST test split, "
                                 "DATA = the Fashion-MNIST folder")
        parser.add_argument("--pairs", type=int, metavar="N",
                            help="two-item canvases to add after the single ones (default: as many as --limit "
                                 "allows; 0 for none); --limit N takes the first N single canvases")
        parser.add_argument("--thresholds", nargs="+", default=list(DEFAULT_THRESHOLDS), metavar="RULE",
                            help=f"map -> mask rules: {', '.join(THRESHOLDS)} (default: {' '.join(DEFAULT_THRESHOLDS)})")
        parser.add_argument("--box", choices=["largest", "tight"], default="largest",
                            help="box the mask's largest 8-connected component (default) or all of it")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> LocalizationBenchmark:
        from . import loading

        model, size, norm = load_vision(args, device)
        if args.pairs is not None and args.pairs < 0:
            raise UsageError(f"--pairs must be 0 or more, got {args.pairs}")
        pairs = args.pairs if args.pairs is not None else args.limit
        samples = localization_samples(args.limit, pairs, root=args.data)
        patch = loading.patch_size(model)
        config = LocalizationConfig(size, norm, tuple(dict.fromkeys(args.thresholds)), args.box,
                                    (size[0] // patch, size[1] // patch))
        return cls(model, samples, config, fashion_data(args, data="fashion_localization"), provenance(args))

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        print(markdown_tables(summary))


def summarise_localization(records: Mapping[tuple, dict], ids: Sequence[str], rows: Sequence[str], cfg: str,
                           thresholds: Sequence[str]) -> dict[str, Any]:
    """Per row and canvas kind (``single``, ``pair``): items, pointing (%), and per threshold
    CorLoc (%), mean mask IoU and mean box IoU (fractions in [0, 1])."""
    results: dict[str, Any] = {}
    for row in rows:
        found = [records[key] for key in ((cfg, row, i) for i in ids) if key in records]
        entry: dict[str, Any] = {}
        for kind in ("single", "pair"):
            items = [item for r in found if r["kind"] == kind for item in r["items"]]
            if not items:
                continue
            entry[kind] = {
                "items": len(items),
                "pointing": float(np.mean([item["pointing"] for item in items])),
                "thresholds": {t: {"corloc": float(np.mean([item[t]["corloc"] for item in items])),
                                   "mask_iou": float(np.mean([item[t]["mask_iou"] for item in items])),
                                   "box_iou": float(np.mean([item[t]["box_iou"] for item in items]))}
                               for t in thresholds},
            }
        results[row] = entry
    return {"benchmark": "localization", "thresholds": list(thresholds), "results": results}


def markdown_tables(summary: Mapping[str, Any]) -> str:
    """One table per canvas kind: pointing, then CorLoc and mask IoU for each threshold (%)."""
    thresholds = summary["thresholds"]
    parts = []
    for kind, title in (("single", "single-item canvases"), ("pair", "two-item canvases (each item from its class's map)")):
        rows = [(name, r[kind]) for name, r in summary["results"].items() if kind in r]
        if not rows:
            continue
        head = ["method", "items", "pointing"] + [f"CorLoc {t}" for t in thresholds] + [f"mask IoU {t}" for t in thresholds]
        lines = [f"**{title}** (%)", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name, r in rows:
            cells = [name, str(r["items"]), f"{100 * r['pointing']:.1f}"]
            cells += [f"{100 * r['thresholds'][t]['corloc']:.1f}" for t in thresholds]
            cells += [f"{100 * r['thresholds'][t]['mask_iou']:.1f}" for t in thresholds]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
