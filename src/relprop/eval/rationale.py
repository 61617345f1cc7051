"""The paper's rationale benchmark (ERASER movies: token-F1 of the top-k words against human
rationales) on the runner, ``relprop eval rationale``.

Every method explains the ground-truth class of each review (its first ``max_length`` word
pieces) with the bundled sentiment MiniLM; word pieces go to words by max
(``token_f1.word_relevance``), and the top-k words, k = 5, 10, ..., 80, are scored against the
human rationale with ERASER's token-level precision / recall / F1, macro-averaged over the
reviews. The selection is the authors' protocol (``token_f1``): relevance clipped at 0 before
the top-k. Ties — after the clip every non-positive word ties at 0 — go to the word that comes
first in the review, the same for every k (deterministic); ``ties="torch"`` takes whichever
``torch.topk`` returns, as the authors' script. ``carry_over=True`` adds their loop's quirk
(words chosen at a smaller k stay in the prediction at a larger k).

One record per review and method holds the word scores (the map; ``None`` for words without
a score) and P/R/F1 per k (``None`` when the review has neither a gold nor a predicted word),
so other protocols can be scored from the records without the model. Output:
``rationale.jsonl``, ``rationale_summary.json``, ``rationale.md`` and ``rationale.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..files import atomic_write, atomic_write_text
from .report import new_figure
from .runner import Benchmark, Explain, Failure, model_device, register_benchmark, report_non_finite
from .token_f1 import DEFAULT_KS, WordEncoding, document_prf, encode_words, rationale_masks, word_relevance

LABELS = {"NEG": 0, "POS": 1}
TABLE_FILE = "rationale.md"
PLOT_FILE = "rationale.png"


@dataclass(frozen=True)
class RationaleConfig:
    """The scoring protocol; the defaults are the authors' (with relprop's tie rule)."""

    ks: tuple[int, ...] = DEFAULT_KS
    clip_negative: bool = True
    carry_over: bool = False
    ties: str = "first"  # "first": the earlier word; "torch": torch.topk's choice
    max_length: int = 512
    reduce: str = "max"  # word pieces -> word

    def __post_init__(self) -> None:
        if self.ties not in ("first", "torch"):
            raise ValueError(f"ties must be 'first' or 'torch', got {self.ties!r}")
        if self.reduce not in ("max", "sum"):
            raise ValueError(f"reduce must be 'max' or 'sum', got {self.reduce!r}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive rationale sizes, got {self.ks}")

    def settings(self) -> dict[str, Any]:
        return {**json.loads(json.dumps(asdict(self))), "explained": "ground truth"}


@dataclass(frozen=True)
class Review:
    """One annotated document: words, class (0 negative, 1 positive) and the rationale mask."""

    id: str
    label: int
    tokens: tuple[str, ...] = field(repr=False)
    rationale: np.ndarray = field(repr=False)
    sources: tuple[Path, ...] = field(default=(), repr=False)


def reviews(folder: Path, split: str = "test", sources: Sequence[Path] = ()) -> list[Review]:
    """The annotated documents of an ERASER folder's ``split``."""
    from ..text.rationales import load_eraser

    try:
        examples = list(load_eraser(Path(folder), split))
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot read the ERASER {split!r} split in {folder}: {error}") from None
    return [Review(ex.docid, LABELS[ex.label], tuple(ex.tokens), ex.rationale, tuple(sources)) for ex in examples]


def zaidan_reviews(archive: Path, split: str = "test") -> list[Review]:
    """The Zaidan et al. (2007) reviews of ``archive``, converted to ERASER's format."""
    from ..text.rationales import convert_zaidan

    if not Path(archive).is_file():
        raise InputError(f"no Zaidan rationale archive at {archive}; give --data (the folder holding "
                         "movies/zaidan_rationales.tar.gz) or --eraser")
    with tempfile.TemporaryDirectory(prefix="eraser_movies_") as folder:
        convert_zaidan(Path(folder), archive=Path(archive))
        return reviews(Path(folder), split, sources=(Path(archive),))


@dataclass
class _Batch:
    samples: list[Review]
    encodings: list[WordEncoding]
    inputs: dict[str, torch.Tensor]
    targets: list[int]


@register_benchmark
class RationaleBenchmark(Benchmark):
    """Token-F1 of each method's top-k words against human rationales (one record per review
    and method)."""

    name = "rationale"
    help = "text: token-F1 of the top-k words against human rationales (ERASER movies)"
    description = ("Explain the true class of each annotated movie review with the bundled sentiment MiniLM and "
                   "score its top-k words, k = 5..80, against the human rationale (ERASER token F1, the "
                   "authors' protocol: relevance clipped at 0, ties to the earlier word).")
    unit = "doc"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, samples: Sequence[Review],
                 config: RationaleConfig = RationaleConfig(), identity: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None):
        super().__init__(model, samples, config, identity, provenance)
        self.tokenizer = tokenizer
        self.device = model_device(model)

    def load(self, sample: Review) -> WordEncoding:
        return encode_words(self.tokenizer, sample.tokens, max_length=self.config.max_length)

    def collate(self, samples: list[Review], loaded: list[WordEncoding]) -> _Batch:
        width = max(len(e.input_ids) for e in loaded)
        ids = torch.full((len(samples), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, e in enumerate(loaded):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, :len(e.input_ids)] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        return _Batch(samples, loaded, inputs, [s.label for s in samples])

    def records(self, explain: Explain, method: str, batch: _Batch, needs: list[list[tuple]],
                failures: list[Failure]) -> list[dict]:
        rows = [i for i, keys in enumerate(needs) if keys]
        if len(rows) < len(batch.samples):
            inputs = {name: value[rows] for name, value in batch.inputs.items()}
        else:
            inputs = batch.inputs
        result = explain(inputs, target=[batch.targets[i] for i in rows])
        predictions = result.logits.argmax(-1).tolist()
        config = self.config
        records = []
        for j, i in enumerate(rows):
            review, encoding = batch.samples[i], batch.encodings[i]
            pieces = result.relevance[j, :len(encoding.input_ids)].detach().float().cpu().numpy()
            if not np.isfinite(pieces).all():
                report_non_finite(failures, review.id, method)
                continue
            words = word_relevance(pieces, encoding.word_ids, n_words=len(review.tokens), reduce=config.reduce)
            masks = rationale_masks(words, config.ks, clip_negative=config.clip_negative,
                                    carry_over=config.carry_over, ties=config.ties)  # type: ignore[arg-type]
            records.append({
                "method": method, "id": review.id, "label": review.label, "pred": int(predictions[j]),
                "words": [None if np.isnan(w) else float(w) for w in words],
                "prf": {str(k): (list(document_prf(masks[k], review.rationale))
                                 if masks[k].any() or review.rationale.any() else None) for k in config.ks},
            })
        return records

    def summarise(self, records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        return summarise_rationale(records, ids, methods, self.config, cfg)

    def report_files(self) -> tuple[str, ...]:
        return (TABLE_FILE, PLOT_FILE)

    def write_reports(self, summary: Mapping[str, Any], folder: Path) -> None:
        atomic_write_text(folder / TABLE_FILE, markdown_table(summary) + "\n")
        plot_token_f1(summary, folder / PLOT_FILE)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from ..text.rationales import default_data_dir

        parser.add_argument("--data", default=str(default_data_dir()),
                            help="folder holding movies/zaidan_rationales.tar.gz (default: $RELPROP_DATA or "
                                 "../shared/data); its reviews are converted to ERASER's format")
        parser.add_argument("--eraser", help="a genuine ERASER movies folder instead of the Zaidan archive")
        parser.add_argument("--split", default="test", help="ERASER split (default test: Zaidan files 800-899)")
        parser.add_argument("--carry-over", action="store_true",
                            help="the authors' loop quirk: keep the words chosen at a smaller k in the "
                                 "prediction at a larger k")
        parser.add_argument("--ties", choices=["first", "torch"], default="first",
                            help="among tied words: the earlier word (default, deterministic) or torch.topk's "
                                 "choice (the authors' call)")
        parser.add_argument("--no-clip", action="store_true",
                            help="rank raw scores instead of clipping them at 0 (not the authors' protocol)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> RationaleBenchmark:
        from ..text.pretrained import load_sentiment_model

        if args.eraser:
            folder = Path(args.eraser)
            samples = reviews(folder, args.split, sources=(folder / f"{args.split}.jsonl",))
            identity: dict[str, Any] = {"data": "eraser", "split": args.split}
        else:
            samples = zaidan_reviews(Path(args.data) / "movies" / "zaidan_rationales.tar.gz", args.split)
            identity = {"data": "zaidan", "split": args.split}
        model, tokenizer = load_sentiment_model()
        config = RationaleConfig(clip_negative=not args.no_clip, carry_over=args.carry_over, ties=args.ties)
        provenance = {"model": "bundled minilm_sst2", "data": str(Path(args.eraser or args.data).resolve())}
        return cls(model.to(device), tokenizer, samples[: args.limit], config, {**identity, "model": "minilm_sst2"},
                   provenance)

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        print(markdown_table(summary))


def summarise_rationale(records: Mapping[tuple, dict], ids: Sequence[str], methods: Sequence[str],
                        config: RationaleConfig, cfg: str) -> dict[str, Any]:
    """Per method and k: macro precision, recall and F1 over the reviews (those with a gold or a
    predicted word), and the classifier's accuracy on the reviews."""
    results: dict[str, Any] = {}
    correct: dict[str, bool] = {}
    for method in methods:
        found = [records[key] for key in ((cfg, method, i) for i in ids) if key in records]
        correct.update({r["id"]: r["pred"] == r["label"] for r in found})
        table: dict[str, Any] = {}
        for k in config.ks:
            scores = [r["prf"][str(k)] for r in found if r["prf"][str(k)] is not None]
            if scores:
                precision, recall, f1 = np.mean(scores, axis=0).tolist()
                table[str(k)] = {"precision": precision, "recall": recall, "f1": f1}
            else:
                table[str(k)] = None
        results[method] = {"n": len(found), "token_f1": table}
    accuracy = float(np.mean(list(correct.values()))) if correct else None
    return {"benchmark": "rationale", "ks": list(config.ks), "classifier_accuracy": accuracy, "results": results}


def markdown_table(summary: Mapping[str, Any], ks: Sequence[int] | None = None) -> str:
    """Token F1 per method (rows) and k (columns), best per column in bold."""
    ks = list(ks or summary["ks"])
    results = {m: r for m, r in summary["results"].items() if r["n"]}
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    best = {k: max((r["token_f1"][str(k)]["f1"] for r in results.values() if r["token_f1"][str(k)]), default=None)
            for k in ks}
    for method, r in results.items():
        cells = []
        for k in ks:
            entry = r["token_f1"][str(k)]
            text = "-" if entry is None else f"{entry['f1']:.3f}"
            cells.append(f"**{text}**" if entry is not None and entry["f1"] == best[k] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_token_f1(summary: Mapping[str, Any], path: Path) -> None:
    """Token F1 against k, one line per method."""
    fig = new_figure((8, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for method, r in summary["results"].items():
        ks = [k for k in summary["ks"] if r["token_f1"].get(str(k))]
        if ks:
            ax.plot(ks, [r["token_f1"][str(k)]["f1"] for k in ks], marker="o", markersize=3, label=method,
                    linewidth=2.5 if method == "transformer_attribution" else 1.2)
    ax.set_xlabel("k (top-k words)")
    ax.set_ylabel("token F1")
    ax.set_title("Token F1 against human rationales vs k\n(authors' protocol: clip at 0, max to words)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))
