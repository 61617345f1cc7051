"""Counterfactual benchmark (``relprop eval counterfactual``): how much of the input must go,
in the order of a method's map, before the model changes its decision (lower = the map points
at what matters). The search is ``relprop.counterfactual.search_removal``.

Data (``--format``): ``fashion`` — cluttered Fashion-MNIST test canvases, units = the model's
patches (an 8x8 grid for the bundled model), a removed patch set to ``--replace`` (0 in [0, 1]
image space by default, as in the perturbation test; or ``blur``); ``sst2`` — the labelled
SST-2 test sentences (GLUE's dev set, ``DATA/test.tsv`` or a ``.tsv`` file), units = words
(a removed word is deleted: all its sub-word tokens; a word's relevance is the max over its
pieces).

Per sample and row the explained class is the model's prediction on the whole input, and the
decision flips when another class becomes top-1. Recorded: the number of units removed in the
map's order at the first flip (``greedy``) and the size of the pruned, 1-minimal set
(``removed``). Summary per row: mean greedy fraction (the benchmark's number), mean pruned
fraction, median greedy fraction, and how often no prefix of the order flipped the decision
(counted as fraction 1.0 in the means; it depends on the order, since removing more can flip
the decision back). ``random_order`` (a uniformly random order, seeded by the sample id) is the
orientation row.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cli import positive_int, replacement_value
from ..counterfactual import (Search, image_counterfactuals, patch_forward, search_removals, text_counterfactuals,
                              word_forward)
from ..errors import InputError, UsageError
from ..files import atomic_write_text
from . import fashion
from .args import add_model_data, fashion_data, load_vision, provenance
from .images import Normalization, blurred, to_unit_tensor
from .runner import Benchmark, Explain, Failure, model_device, register_benchmark

TABLE_FILE = "counterfactual.md"
RANDOM_ORDER = "random_order"


@dataclass(frozen=True)
class CounterfactualConfig:
    data: str = "fashion"                         # "fashion" (patches) or "sst2" (words)
    image_size: tuple[int, int] = (224, 224)
    normalization: Normalization = Normalization()
    patch_grid: tuple[int, int] = (14, 14)
    replace: float | str = 0.0
    prune: bool = True

    def settings(self) -> dict[str, Any]:
        settings = json.loads(json.dumps(asdict(self)))
        if self.data != "fashion":          # text: no images
            for key in ("image_size", "normalization", "patch_grid", "replace"):
                del settings[key]
        return settings


@dataclass(frozen=True)
class Sentence:
    id: str
    text: str
    label: int
    source: Path = field(repr=False)

    @property
    def sources(self) -> tuple[Path, ...]:
        return (self.source,)

    def load(self) -> str:
        return self.text


def sst2_sentences(path: str | Path, limit: int | None = None) -> list[Sentence]:
    """The sentences of an SST-2 ``sentence<TAB>label`` file (``DATA/test.tsv`` for a folder)."""
    from ..text.corpus import read_sst2

    file = Path(path)
    if file.is_dir():
        file = file / "test.tsv"
    try:
        texts, labels = read_sst2(file)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot read SST-2 sentences from {file}: {error}") from None
    return [Sentence(f"sst2/{file.stem}/{i}", t, y, file) for i, (t, y) in enumerate(zip(texts, labels))][:limit]


class _MethodExplainer:
    """The runner's per-method ``explain`` where the library's helpers expect an ``Explainer``
    (``explain(inputs, method, target=...)``); everything else (``logits``, ``labels``,
    ``model``) from a plain explainer of the same model."""

    def __init__(self, explain: Explain, explainer: Any):
        self._explain, self._explainer = explain, explainer

    def explain(self, inputs: Any, method: str | None = None, target: Any = None, **options: Any) -> Any:
        return self._explain(inputs, target=target)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._explainer, name)


def _random_scores(sample_id: str, n: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(sample_id.encode())).random(n)


def _record(row: str, sample_id: str, search: Search) -> dict:
    return {"method": row, "id": sample_id, "units": search.n_units, "greedy": search.greedy,
            "removed": len(search.removed), "flipped": search.flipped, "pred": search.original_class,
            "new_class": search.new_class, "forwards": search.forwards}


@register_benchmark
class CounterfactualBenchmark(Benchmark):
    """One record per sample and row: how many patches / words went before the flip."""

    name = "counterfactual"
    help = "counterfactuals: fraction of patches / words removed in map order before the prediction flips"
    description = ("Remove patches (Fashion-MNIST canvases) or words (SST-2 sentences) in the order of each "
                   "method's map until the prediction changes, then prune the set to a 1-minimal one; report the "
                   "mean fraction removed (lower = the map points at what matters).")
    baselines = (RANDOM_ORDER,)
    unit = "sample"                                   # an image or a sentence

    def __init__(self, model: torch.nn.Module, samples: Sequence[Any], config: CounterfactualConfig,
                 identity: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
                 tokenizer: Any = None, forward_batch_size: int = 64):
        super().__init__(model, samples, config, identity, provenance)
        if config.data == "sst2" and tokenizer is None:
            raise ValueError("the sst2 counterfactual benchmark needs the model's tokenizer")
        self.tokenizer = tokenizer
        self.forward_batch_size = forward_batch_size
        self.device = model_device(model)
        self._plain: Any = None

    @property
    def plain(self) -> Any:
        """A ``relprop.Explainer`` of the model for the candidates' forwards (inference behaviour)."""
        if self._plain is None:
            import relprop

            self._plain = relprop.Explainer(self.model)
        return self._plain

    def load(self, sample: Any) -> Any:
        if self.config.data == "sst2":
            return sample.load()
        image = sample.load()
        blur = to_unit_tensor(blurred(image), self.config.image_size) if self.config.replace == "blur" else None
        return to_unit_tensor(image, self.config.image_size), blur

    def collate(self, samples: list[Any], loaded: list[Any]) -> Any:
        if self.config.data == "sst2":
            return samples, loaded
        images = torch.stack([image for image, _ in loaded]).to(self.device)
        if self.config.replace == "blur":
            fill = torch.stack([blur for _, blur in loaded]).to(self.device)
        else:
            fill = torch.tensor(float(self.config.replace), device=self.device).expand_as(images)
        return samples, images, fill

    def records(self, explain: Explain, method: str, batch: Any, needs: list[list[tuple]],
                failures: list[Failure]) -> list[dict]:
        rows = [i for i, keys in enumerate(needs) if keys]
        explainer = _MethodExplainer(explain, self.plain)
        if self.config.data == "sst2":
            samples, texts = batch
            found = text_counterfactuals(explainer, self.tokenizer, [texts[i] for i in rows], method,
                                         batch_size=self.forward_batch_size, prune=self.config.prune)
            searches = [cf.search for cf in found]
        else:
            samples, images, fill = batch
            idx = torch.tensor(rows, device=self.device)
            searches = [cf.search for cf in image_counterfactuals(
                explainer, images[idx], self.config.normalization, method, replacement=fill[idx],
                batch_size=self.forward_batch_size, prune=self.config.prune)]
        return [_record(method, samples[i].id, s) for i, s in zip(rows, searches)]

    def baseline_records(self, name: str, batch: Any, needs: list[list[tuple]],
                         failures: list[Failure]) -> list[dict]:
        rows = [i for i, keys in enumerate(needs) if keys]
        if self.config.data == "sst2":
            samples, texts = batch
            forward, counts = word_forward(self.plain, self.tokenizer, [texts[i] for i in rows], _max_length(self))
        else:
            samples, images, fill = batch
            norm = self.config.normalization
            idx = torch.tensor(rows, device=self.device)
            forward = patch_forward(lambda x: self.plain.logits(norm(x)), images[idx], fill[idx],
                                    self.config.patch_grid)
            counts = [self.config.patch_grid[0] * self.config.patch_grid[1]] * len(rows)
        kept = [j for j, n in enumerate(counts) if n]     # a text without words has nothing to remove
        searches = search_removals([_random_scores(samples[rows[j]].id, counts[j]) for j in kept],
                                   lambda requests: forward([(kept[k], row) for k, row in requests]),
                                   [None] * len(kept), batch_size=self.forward_batch_size, prune=self.config.prune)
        return [_record(name, samples[rows[j]].id, s) for j, s in zip(kept, searches)]

    def summarise(self, records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        return summarise_counterfactual(records, ids, methods, cfg, self.config.data)

    def report_files(self) -> tuple[str, ...]:
        return (TABLE_FILE,)

    def write_reports(self, summary: Mapping[str, Any], folder: Path) -> None:
        atomic_write_text(folder / TABLE_FILE, markdown_table(summary) + "\n")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_data(parser, kinds=("image", "text"))
        parser.add_argument("--format", choices=["fashion", "sst2"], default="fashion",
                            help="fashion: Fashion-MNIST test canvases (DATA = its folder), units = patches; "
                                 "sst2: SST-2 sentences (DATA = a folder with test.tsv, or a .tsv file), units = words")
        parser.add_argument("--replace", type=replacement_value, default=0.0,
                            help="fashion: value of removed pixels in [0, 1] image space (default 0), or 'blur'")
        parser.add_argument("--no-prune", action="store_true", help="skip pruning (record the greedy count only)")
        parser.add_argument("--forward-batch-size", type=positive_int, default=64, metavar="N",
                            help="candidate inputs per forward pass (default 64)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> CounterfactualBenchmark:
        from . import loading

        prune = not args.no_prune
        if args.format == "sst2":
            from ..loading import load_text_classifier

            if args.replace != 0.0:
                raise UsageError("--replace is for --format fashion; a removed word is deleted")
            model, tokenizer = load_text_classifier(args.model)
            model.to(device)
            samples = sst2_sentences(args.data, args.limit)
            where = provenance(args)
            return cls(model, samples, CounterfactualConfig("sst2", prune=prune), {"data": "sst2"}, where,
                       tokenizer, args.forward_batch_size)
        model, size, norm = load_vision(args, device)
        patch = loading.patch_size(model)
        canvases = fashion.canvas_images(root=args.data)[: args.limit]
        config = CounterfactualConfig("fashion", size, norm, (size[0] // patch, size[1] // patch), args.replace, prune)
        return cls(model, canvases, config, fashion_data(args, labels="fashion-mnist"), provenance(args),
                   forward_batch_size=args.forward_batch_size)

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        print(markdown_table(summary))


def _max_length(benchmark: CounterfactualBenchmark) -> int:
    from ..text.explain import _max_length as limit

    return limit(benchmark.model, benchmark.tokenizer)


def summarise_counterfactual(records: Mapping[tuple, dict], ids: Sequence[str], rows: Sequence[str], cfg: str,
                             data: str = "fashion") -> dict[str, Any]:
    """Per row: n, mean and median greedy fraction, mean pruned fraction, mean units removed
    (greedy, pruned), and the share of samples that never flipped (fraction 1.0 in the means)."""
    results: dict[str, Any] = {}
    for row in rows:
        found = [records[key] for key in ((cfg, row, i) for i in ids) if key in records]
        entry: dict[str, Any] = {"n": len(found)}
        if found:
            greedy = np.array([r["greedy"] / r["units"] if r["flipped"] else 1.0 for r in found])
            pruned = np.array([r["removed"] / r["units"] if r["flipped"] else 1.0 for r in found])
            flipped = [r for r in found if r["flipped"]]
            entry.update(greedy_fraction=float(greedy.mean()), greedy_median=float(np.median(greedy)),
                         pruned_fraction=float(pruned.mean()), no_flip=1 - len(flipped) / len(found),
                         greedy_units=float(np.mean([r["greedy"] for r in flipped])) if flipped else None,
                         pruned_units=float(np.mean([r["removed"] for r in flipped])) if flipped else None,
                         units=float(np.mean([r["units"] for r in found])))
        results[row] = entry
    return {"benchmark": "counterfactual", "data": data, "unit": "word" if data == "sst2" else "patch",
            "results": results}


def markdown_table(summary: Mapping[str, Any]) -> str:
    units = "patches" if summary["unit"] == "patch" else "words"
    lines = [f"| method | removed in map order before the flip (% of {units}, mean) ↓ | median | after pruning (%) ↓ "
             f"| {units} removed (greedy / pruned, flipped samples) | no flip (%) | samples |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary["results"].items():
        if not r["n"]:
            lines.append(f"| {name} | - | - | - | - | - | 0 |")
            continue
        counts = "-" if r["greedy_units"] is None else f"{r['greedy_units']:.1f} / {r['pruned_units']:.1f}"
        lines.append(f"| {name} | {100 * r['greedy_fraction']:.1f} | {100 * r['greedy_median']:.1f} "
                     f"| {100 * r['pruned_fraction']:.1f} | {counts} | {100 * r['no_flip']:.1f} | {r['n']} |")
    return "\n".join(lines)
