"""Class-specificity test on two-item canvases (not in the paper; it makes its claim of
class-specific maps measurable).

Each sample shows two items of different classes, A and B, with disjoint pixel masks. Every
method explains the image twice, once for A's class and once for B's, each map upsampled to
the image size as in the other benchmarks. Per method:

* ``positive_share``: share of the map's positive relevance (negatives clipped to 0) that
  lies on the explained item's mask; mean over all explained items (two per pair). A map
  with no positive relevance has no share; it is counted in ``no_positive``, not averaged.
* ``win_rate``: how often the explained item gets more positive relevance (sum inside its
  mask) than the other item; a tie counts one half.
* ``sensitivity``: mean over pairs of sum|map_A - map_B| / (sum|map_A| + sum|map_B|) over
  the pixels of the raw (unclipped) maps; 0 when both maps are zero.

A class-agnostic method (raw attention, rollout) gives the same map for both classes, so
its sensitivity is exactly 0 and its win rate exactly 50%: whatever item wins for class A
also wins for class B. Both explanations are computed in separate passes over the same
input batch, so identical maps are bitwise identical.

Output: ``class_specificity.jsonl`` (one record per pair and method; a rerun skips what is
there), ``class_specificity_summary.json``, ``class_specificity.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..files import atomic_write, atomic_write_text
from . import fashion
from .args import add_model_data, fashion_data, load_vision, provenance
from .images import Normalization, checked_mask, mask_to_tensor, to_unit_tensor
from .report import new_figure
from .runner import (Benchmark, Explain, Explainer, Failure, model_device, register_benchmark, report_non_finite,
                     run_benchmark)


TABLE_FILE = "class_specificity.md"
PLOT_FILE = "class_specificity.png"


class PairLike(Protocol):
    """A two-item sample: ``load()`` -> (RGB image, (mask_a, mask_b), (label_a, label_b))."""

    @property
    def id(self) -> str: ...

    def load(self) -> tuple[Image.Image, tuple[np.ndarray, np.ndarray], tuple[int, int]]: ...


@dataclass(frozen=True)
class ClassSpecificityConfig:
    image_size: tuple[int, int] = (224, 224)
    normalization: Normalization = Normalization()

    def settings(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as stored


def _win(own: float, other: float) -> float:
    return 1.0 if own > other else 0.0 if own < other else 0.5


def pair_scores(map_a: torch.Tensor, map_b: torch.Tensor, mask_a: torch.Tensor,
                mask_b: torch.Tensor) -> dict[str, Any]:
    """Scores of one pair. ``map_a`` explains item A's class, ``map_b`` item B's; all [H, W]
    (masks bool). Sums in float64."""
    a, b = map_a.detach().double().cpu(), map_b.detach().double().cpu()
    ma, mb = mask_a.bool().cpu(), mask_b.bool().cpu()
    scores: dict[str, Any] = {}
    for name, m, own, other in (("a", a, ma, mb), ("b", b, mb, ma)):
        pos = m.clamp(min=0)
        total, on_own, on_other = pos.sum().item(), pos[own].sum().item(), pos[other].sum().item()
        scores[f"share_{name}"] = on_own / total if total > 0 else None
        scores[f"win_{name}"] = _win(on_own, on_other)
    denom = (a.abs().sum() + b.abs().sum()).item()
    scores["sensitivity"] = (a - b).abs().sum().item() / denom if denom > 0 else 0.0
    return scores


def _load(sample: PairLike, config: ClassSpecificityConfig):
    image, (mask_a, mask_b), (label_a, label_b) = sample.load()
    if label_a == label_b:
        raise ValueError(f"both items are of class {label_a}; a pair needs two classes")
    size = config.image_size
    return (to_unit_tensor(image, size), mask_to_tensor(checked_mask(mask_a, image), size),
            mask_to_tensor(checked_mask(mask_b, image), size),
            int(label_a), int(label_b))


@register_benchmark
class ClassSpecificityBenchmark(Benchmark):
    """Both classes of each two-item canvas explained (one record per method and pair)."""

    name = "class_specificity"
    help = "two-item canvases: is each class's map on its own item?"
    description = ("Explain both classes of two-item Fashion-MNIST canvases; report the share of positive "
                   "relevance on the explained item, how often it gets more than the other item, and the class "
                   "sensitivity of the maps.")

    def __init__(self, model: torch.nn.Module, samples: Sequence[PairLike],
                 config: ClassSpecificityConfig = ClassSpecificityConfig(),
                 identity: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None):
        super().__init__(model, samples, config, identity, provenance)
        self.device = model_device(model)

    def load(self, sample: PairLike):
        return _load(sample, self.config)

    def collate(self, samples: list[PairLike], loaded: list[Any]) -> tuple[list, list, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
        images = torch.stack([item[0] for item in loaded]).to(self.device)
        labels_a = torch.tensor([item[3] for item in loaded], device=self.device)
        labels_b = torch.tensor([item[4] for item in loaded], device=self.device)
        return samples, loaded, images, labels_a, labels_b

    def records(self, explain: Explain, method: str, batch: Any, needs: list[list[tuple]],
                failures: list[Failure]) -> list[dict]:
        samples, loaded, images, labels_a, labels_b = batch
        rows = [i for i, keys in enumerate(needs) if keys]
        idx = torch.tensor(rows, device=self.device)
        x = self.config.normalization(images[idx])
        res_a = explain(x, target=labels_a[idx])
        res_b = explain(x, target=labels_b[idx])
        maps_a = res_a.upsampled(size=self.config.image_size)
        maps_b = res_b.upsampled(size=self.config.image_size)
        top2 = res_a.logits.topk(min(2, res_a.logits.shape[-1]), dim=-1).indices.cpu()
        records = []
        for j, i in enumerate(rows):
            if not (torch.isfinite(maps_a[j]).all() and torch.isfinite(maps_b[j]).all()):
                report_non_finite(failures, samples[i].id, method)
                continue
            _, mask_a, mask_b, label_a, label_b = loaded[i]
            records.append({
                "method": method, "id": samples[i].id, "labels": [label_a, label_b],
                "pred": int(top2[j, 0]), "top2": {label_a, label_b} <= set(top2[j].tolist()),
                **pair_scores(maps_a[j], maps_b[j], mask_a, mask_b),
            })
        return records

    def summarise(self, records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        return summarise_class_specificity(records, ids, methods, cfg)

    def report_files(self) -> tuple[str, ...]:
        return (TABLE_FILE, PLOT_FILE)

    def write_reports(self, summary: Mapping[str, Any], folder: Path) -> None:
        atomic_write_text(folder / TABLE_FILE, markdown_table(summary) + "\n")
        plot_class_specificity(summary, folder / PLOT_FILE)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_data(parser)
        parser.add_argument("--format", choices=["fashion"], default="fashion",
                            help="fashion: pair canvases of the Fashion-MNIST test split, DATA = the "
                                 "Fashion-MNIST folder")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> ClassSpecificityBenchmark:
        model, size, norm = load_vision(args, device)
        samples = fashion.pair_samples(root=args.data)[: args.limit]
        return cls(model, samples, ClassSpecificityConfig(size, norm), fashion_data(args, data="fashion_pairs"),
                   provenance(args))

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        print(markdown_table(summary))


def run_class_specificity(
    model: torch.nn.Module,
    explainer: Explainer,
    samples: Sequence[PairLike],
    methods: Sequence[str],
    out_dir: str | Path,
    config: ClassSpecificityConfig = ClassSpecificityConfig(),
    identity: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    restart: bool = False,
    provenance: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the class-specificity test; writes summary JSON, table and plot.
    ``identity``, ``restart``, ``provenance`` and ``options`` as in
    ``perturbation.run_perturbation``."""
    benchmark = ClassSpecificityBenchmark(model, samples, config, identity, provenance)
    return run_benchmark(benchmark, explainer, methods, out_dir, options=options, batch_size=batch_size,
                         progress=progress, restart=restart)


def _metrics(found: list[dict]) -> dict[str, Any]:
    entry: dict[str, Any] = {"n": len(found), "positive_share": None, "no_positive": 0, "win_rate": None,
                             "sensitivity": None}
    if not found:
        return entry
    shares = [r[k] for r in found for k in ("share_a", "share_b")]
    defined = [s for s in shares if s is not None]
    entry.update(
        positive_share=float(np.mean(defined)) if defined else None,
        no_positive=len(shares) - len(defined),
        win_rate=float(np.mean([r[k] for r in found for k in ("win_a", "win_b")])),
        sensitivity=float(np.mean([r["sensitivity"] for r in found])),
    )
    return entry


def summarise_class_specificity(records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                                cfg: str) -> dict[str, Any]:
    """Per method: the three scores over all pairs, and over the pairs whose two classes
    are the model's top-2 (``top2``), where explaining either class is most meaningful.
    Fractions in [0, 1]."""
    results: dict[str, Any] = {}
    both_top2: list[bool] = []
    for method in methods:
        found = [records[key] for key in ((cfg, method, i) for i in ids) if key in records]
        results[method] = {**_metrics(found), "top2": _metrics([r for r in found if r["top2"]])}
        if len(found) > len(both_top2):
            both_top2 = [r["top2"] for r in found]
    return {"benchmark": "class_specificity", "results": results,
            "pairs_with_both_classes_in_top2": float(np.mean(both_top2)) if both_top2 else None}


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of a class-specificity summary (percentages; sensitivity as 0..1)."""
    lines = ["| method | positive relevance on the explained item (%) | explained item gets more (%) "
             "| class sensitivity | pairs | maps without positive relevance |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, r in summary["results"].items():
        sens = "-" if r["sensitivity"] is None else f"{r['sensitivity']:.3f}"
        lines.append(f"| {method} | {_pct(r['positive_share'])} | {_pct(r['win_rate'])} | {sens} | {r['n']} "
                     f"| {r['no_positive']} |")
    return "\n".join(lines)


def plot_class_specificity(summary: Mapping[str, Any], path: str | Path) -> None:
    """Three bar panels (share on item, win rate, sensitivity), one bar per method."""
    methods = [m for m, r in summary["results"].items() if r["n"]]
    panels = (("positive_share", "positive relevance on explained item (%)", 100, None),
              ("win_rate", "explained item gets more relevance (%)", 100, 50),
              ("sensitivity", "class sensitivity (0 = class-agnostic)", 1, None))
    fig = new_figure((15, 0.45 * max(len(methods), 1) + 1.6))
    for k, (key, title, scale, ref) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 3, k)
        values = [scale * (summary["results"][m][key] or 0.0) for m in methods]
        ax.barh(range(len(methods)), values, color="tab:blue")
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods if k == 1 else [""] * len(methods), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, scale)
        if ref is not None:
            ax.axvline(ref, color="grey", linestyle="--", linewidth=1)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
