"""The paper's rationale benchmark (ERASER movies, token-F1 of the top-k words) on real human
rationales, with the bundled sentiment MiniLM.

The Zaidan et al. (2007) annotated reviews are converted into ERASER's format (or a genuine
ERASER ``movies`` folder is read); every method explains the ground-truth class of each review
(first 512 word pieces, as the model's limit). Scoring follows the authors' protocol
(``relprop.eval.token_f1``): word-piece relevance clipped at 0, word pieces aggregated to words
by max, the k most relevant words for k = 5, 10, ..., 80 scored against the human rationale with
ERASER's token-level precision / recall / F1 (macro over documents). Ties go to the earlier
word. Two variants are scored from the same relevances: the authors' exact selection
(``torch.topk`` ties, smaller-k words carried over) and the unclipped ranking relprop used before.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/text_rationales.py [--eraser PATH] [--split test]
    python benchmarks/text_rationales.py --rescore     # re-score the stored relevances only

writes ``benchmarks/results/text_rationales/{results.json,table.md,token_f1.png}`` and the
word-piece relevances ``relevances.npz`` (not committed), which ``--rescore`` reads instead of
running the model. The classifier never saw these reviews: it was fine-tuned on SST-2 only.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import relprop
from relprop.eval.token_f1 import DEFAULT_KS, encode_words, rationale_masks, token_f1_table, word_relevance
from relprop.files import atomic_write, atomic_write_text, output_dir
from relprop.text.pretrained import load_sentiment_model
from relprop.text.rationales import convert_zaidan, default_data_dir, load_eraser

OUT = Path(__file__).parent / "results" / "text_rationales"
CACHE = "relevances.npz"
LABELS = {"NEG": 0, "POS": 1}
MAX_LENGTH = 512
# The main table first; every protocol is scored on the same word-piece relevances.
PROTOCOLS = {
    "authors": {"clip_negative": True, "carry_over": False, "ties": "first"},
    "authors_exact": {"clip_negative": True, "carry_over": True, "ties": "torch"},
    "unclipped": {"clip_negative": False, "carry_over": False, "ties": "first"},
}
PROTOCOL_NOTES = {
    "authors": "relprop's default: clip at 0, max to words, k = 5..80, ties to the earlier word",
    "authors_exact": "the authors' script: as above, but torch.topk ties and smaller-k words carried over",
    "unclipped": "relprop's previous protocol: raw scores ranked (no clip), ties to the earlier word",
}


def explain_documents(explainer, tokenizer, examples, methods, batch_size):
    """Per method, the word-piece relevance of each document; each document's word id per
    piece (-1: special); the model's predictions."""
    pieces = {m: [] for m in methods}
    word_ids, predictions = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        encodings = [encode_words(tokenizer, ex.tokens, max_length=MAX_LENGTH) for ex in batch]
        width = max(len(e.input_ids) for e in encodings)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, :len(e.input_ids)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        targets = [LABELS[ex.label] for ex in batch]
        predictions += explainer.logits(inputs).argmax(1).tolist()
        word_ids += [e.word_ids for e in encodings]
        for method in methods:
            result = explainer.explain(inputs, method, target=targets)
            for i, e in enumerate(encodings):
                pieces[method].append(result.relevance[i, :len(e.input_ids)].float().numpy())
        print(f"{min(start + batch_size, len(examples))}/{len(examples)} documents", flush=True)
    return pieces, word_ids, predictions


def save_cache(path: Path, meta: dict, examples, pieces, word_ids, predictions) -> None:
    """Everything scoring needs, so protocol variants are re-scored without the model."""
    arrays = {
        "meta": np.array(json.dumps(meta)),
        "docids": np.array([ex.docid for ex in examples]),
        "labels": np.array([LABELS[ex.label] for ex in examples]),
        "predictions": np.array(predictions),
        "n_words": np.array([len(ex.tokens) for ex in examples]),
        "gold": np.concatenate([ex.rationale for ex in examples]),
        "n_pieces": np.array([len(w) for w in word_ids]),
        "word_ids": np.concatenate(word_ids).astype(np.int32),
        **{f"pieces/{m}": np.concatenate(p).astype(np.float32) for m, p in pieces.items()},
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def load_cache(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"no stored relevances at {path}: run without --rescore first")
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        return {
            "meta": meta,
            "labels": data["labels"], "predictions": data["predictions"],
            "n_words": data["n_words"],
            "gold": _per_document(data["gold"], data["n_words"]),
            "word_ids": _per_document(data["word_ids"], data["n_pieces"]),
            "pieces": {m: _per_document(data[f"pieces/{m}"], data["n_pieces"]) for m in meta["methods"]},
        }


def _per_document(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1])


def score(cache: dict) -> tuple[dict, dict]:
    """Token-F1 tables per protocol and method, and per method how often ties decide."""
    tables, ties = {name: {} for name in PROTOCOLS}, {}
    golds = cache["gold"]
    for method, pieces in cache["pieces"].items():
        words = [word_relevance(p, w, n_words=n) for p, w, n in zip(pieces, cache["word_ids"], cache["n_words"])]
        for name, protocol in PROTOCOLS.items():
            table = token_f1_table(words, golds, DEFAULT_KS, **protocol)
            sizes = [rationale_masks(w, DEFAULT_KS, **protocol) for w in words]
            for k in DEFAULT_KS:
                table[k]["mean_words"] = float(np.mean([s[k].sum() for s in sizes]))
            tables[name][method] = {str(k): row for k, row in table.items()}
        positive = np.array([int(np.sum(w > 0)) for w in words])
        ties[method] = {
            "mean_scored_words": float(np.mean([np.sum(~np.isnan(w)) for w in words])),
            "mean_positive_words": float(positive.mean()),
            "documents_with_fewer_than_80_positive_words": int(np.sum(positive < 80)),
            "documents_with_fewer_than_5_positive_words": int(np.sum(positive < 5)),
        }
    return tables, ties


def plot(table, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for method, rows in table.items():
        ks = sorted(int(k) for k in rows)
        ax.plot(ks, [rows[str(k)]["f1"] for k in ks], marker="o", markersize=3, label=method,
                linewidth=2.5 if method == "transformer_attribution" else 1.2)
    ax.set_xlabel("k (top-k words)")
    ax.set_ylabel("token F1")
    ax.set_title("ERASER movies (Zaidan rationales): token F1 vs k\n(authors' protocol: clip at 0, max to words)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # clear of the curves
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def markdown(table, ks) -> str:
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    best = {k: max(table[m][str(k)]["f1"] for m in table) for k in ks}
    for method, rows in table.items():
        cells = []
        for k in ks:
            f1 = rows[str(k)]["f1"]
            cells.append(f"**{f1:.3f}**" if f1 == best[k] else f"{f1:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tie_markdown(ties, tables) -> str:
    lines = ["| method | scored words | positive words | docs < 80 positive | docs < 5 positive "
             "| words at k=80, authors_exact |", "|---|---|---|---|---|---|"]
    for method, row in ties.items():
        lines.append(f"| {method} | {row['mean_scored_words']:.1f} | {row['mean_positive_words']:.1f} "
                     f"| {row['documents_with_fewer_than_80_positive_words']} "
                     f"| {row['documents_with_fewer_than_5_positive_words']} "
                     f"| {tables['authors_exact'][method]['80']['mean_words']:.1f} |")
    return "\n".join(lines)


def report(cache: dict, out: Path) -> None:
    tables, ties = score(cache)
    meta = cache["meta"]
    accuracy = float(np.mean(cache["predictions"] == cache["labels"]))
    results = {**meta, "documents": len(cache["labels"]), "classifier_accuracy": accuracy,
               "explained_class": "ground truth", "aggregation": "max", "ks": list(DEFAULT_KS),
               "protocols": {name: {**PROTOCOLS[name], "note": PROTOCOL_NOTES[name]} for name in PROTOCOLS},
               "token_f1": tables["authors"],
               "variants": {name: tables[name] for name in PROTOCOLS if name != "authors"},
               "ties": ties}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    parts = []
    for name in PROTOCOLS:
        parts += [f"## {name}: {PROTOCOL_NOTES[name]}", "", markdown(tables[name], DEFAULT_KS), ""]
    parts += ["## How often ties decide (word scores; means over documents)", "", tie_markdown(ties, tables), ""]
    atomic_write_text(out / "table.md", "\n".join(parts))
    plot(tables["authors"], out / "token_f1.png")
    print("\n".join(parts))
    print(f"{results['documents']} documents, classifier accuracy {accuracy:.3f}, "
          f"explained in {meta['wall_seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eraser", help="a genuine ERASER movies folder (default: convert the Zaidan archive)")
    parser.add_argument("--data", default=str(default_data_dir()), help="folder with movies/zaidan_rationales.tar.gz")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--methods", nargs="+", default=relprop.methods())
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--rescore", action="store_true",
                        help=f"re-score the relevances stored in OUT/{CACHE} instead of running the model")
    args = parser.parse_args()
    out = output_dir(args.out)
    if args.rescore:
        report(load_cache(out / CACHE), out)
        return
    torch.manual_seed(0)
    folder = args.eraser
    if folder is None:
        folder = tempfile.mkdtemp(prefix="eraser_movies_")
        convert_zaidan(Path(folder), archive=Path(args.data) / "movies" / "zaidan_rationales.tar.gz")
    examples = list(load_eraser(Path(folder), args.split))[:args.limit]
    model, tokenizer = load_sentiment_model()
    explainer = relprop.Explainer(model)
    started = time.time()
    pieces, word_ids, predictions = explain_documents(explainer, tokenizer, examples, args.methods, args.batch_size)
    meta = {"split": args.split, "source": "eraser" if args.eraser else "zaidan", "methods": list(args.methods),
            "max_length": MAX_LENGTH, "wall_seconds": round(time.time() - started, 1)}
    save_cache(out / CACHE, meta, examples, pieces, word_ids, predictions)
    report(load_cache(out / CACHE), out)


if __name__ == "__main__":
    main()
