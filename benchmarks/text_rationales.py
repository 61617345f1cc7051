"""The paper's rationale benchmark (ERASER movies, token-F1 of the top-k words) on real human
rationales, with the bundled sentiment MiniLM.

The Zaidan et al. (2007) annotated reviews are converted into ERASER's format (or a genuine
ERASER ``movies`` folder is read); every method explains the ground-truth class of each review
(first 512 word pieces, as the model's limit); word pieces are aggregated to words by max;
for k = 10, 20, ..., 80 the k most relevant words are scored against the human rationale
with ERASER's token-level precision / recall / F1 (macro over documents).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/text_rationales.py [--eraser PATH] [--split test]

writes ``benchmarks/results/text_rationales/{results.json,table.md,token_f1.png}``.
The classifier never saw these reviews: it was fine-tuned on SST-2 only.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import relprop
from relprop.eval.token_f1 import DEFAULT_KS, encode_words, token_f1_table, word_relevance
from relprop.text.pretrained import load_sentiment_model
from relprop.text.rationales import convert_zaidan, default_data_dir, load_eraser

OUT = Path(__file__).parent / "results" / "text_rationales"
LABELS = {"NEG": 0, "POS": 1}


def explain_documents(explainer, tokenizer, examples, methods, batch_size, max_length):
    """Per method, one word-relevance array per document; plus the model's predictions."""
    relevances = {m: [] for m in methods}
    predictions = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        encodings = [encode_words(tokenizer, ex.tokens, max_length=max_length) for ex in batch]
        width = max(len(e.input_ids) for e in encodings)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, :len(e.input_ids)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        targets = [LABELS[ex.label] for ex in batch]
        predictions += explainer.logits(inputs).argmax(1).tolist()
        for method in methods:
            result = explainer.explain(inputs, method, target=targets)
            for i, (ex, e) in enumerate(zip(batch, encodings)):
                scores = result.relevance[i, :len(e.input_ids)].double().numpy()
                relevances[method].append(word_relevance(scores, e.word_ids, n_words=len(ex.tokens)))
        print(f"{min(start + batch_size, len(examples))}/{len(examples)} documents", flush=True)
    return relevances, predictions


def plot(table, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, rows in table.items():
        ks = sorted(int(k) for k in rows)
        ax.plot(ks, [rows[str(k)]["f1"] for k in ks], marker="o", label=method,
                linewidth=2.5 if method == "transformer_attribution" else 1.2)
    ax.set_xlabel("k (top-k words)")
    ax.set_ylabel("token F1")
    ax.set_title("ERASER movies (Zaidan rationales): token F1 vs k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eraser", help="a genuine ERASER movies folder (default: convert the Zaidan archive)")
    parser.add_argument("--data", default=str(default_data_dir()), help="folder with movies/zaidan_rationales.tar.gz")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--methods", nargs="+", default=relprop.methods())
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = args.eraser
    if folder is None:
        folder = tempfile.mkdtemp(prefix="eraser_movies_")
        convert_zaidan(Path(folder), archive=Path(args.data) / "movies" / "zaidan_rationales.tar.gz")
    examples = list(load_eraser(Path(folder), args.split))[:args.limit]
    model, tokenizer = load_sentiment_model()
    explainer = relprop.Explainer(model)
    started = time.time()
    relevances, predictions = explain_documents(explainer, tokenizer, examples, args.methods, args.batch_size,
                                                max_length=512)
    golds = [ex.rationale for ex in examples]
    table = {m: {str(k): v for k, v in token_f1_table(relevances[m], golds, DEFAULT_KS).items()}
             for m in args.methods}
    accuracy = float(np.mean([p == LABELS[ex.label] for p, ex in zip(predictions, examples)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"documents": len(examples), "split": args.split, "source": "eraser" if args.eraser else "zaidan",
               "classifier_accuracy": accuracy, "explained_class": "ground truth", "aggregation": "max",
               "max_length": 512, "wall_seconds": round(time.time() - started, 1), "token_f1": table}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown(table, DEFAULT_KS) + "\n")
    plot(table, out / "token_f1.png")
    print(markdown(table, DEFAULT_KS))
    print(f"{len(examples)} documents, classifier accuracy {accuracy:.3f}, {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
