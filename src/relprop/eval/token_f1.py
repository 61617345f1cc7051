"""ERASER token-level rationale agreement: top-k words by relevance vs. human rationales.

As in the paper's movie-review experiment, the predicted rationale of a document is its k
most relevant words, for k in 10, 20, ..., 80. Scoring follows ERASER's ``token_prf``
(``score_hard_rationale_predictions`` on token-level rationales): per document,
precision = |pred & gold| / |pred| and recall = |pred & gold| / |gold| (0 when the
denominator is 0), F1 = 0 if P or R is 0, else their harmonic mean. "macro" averages the
per-document P, R and F1 separately over documents (so macro F1 is not the F1 of macro P/R);
a document with neither gold nor predicted tokens is not counted. "micro" pools the counts.

Relevance arrays hold one score per document word; NaN marks words without a score (e.g.
cut off by the model's length limit), which are never selected but still count as gold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

DEFAULT_KS = tuple(range(10, 90, 10))


def top_k_mask(relevance: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k highest-scoring words; ties go to the earlier word; NaN never."""
    relevance = np.asarray(relevance, dtype=float)
    scored = np.flatnonzero(~np.isnan(relevance))
    order = scored[np.argsort(-relevance[scored], kind="stable")]
    mask = np.zeros(relevance.shape, dtype=bool)
    mask[order[:k]] = True
    return mask


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall)


def document_prf(predicted: np.ndarray, gold: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of one document's predicted token mask against the gold mask."""
    hits = int(np.sum(predicted & gold))
    precision = hits / predicted.sum() if predicted.any() else 0.0
    recall = hits / gold.sum() if gold.any() else 0.0
    return precision, recall, _f1(precision, recall)


def token_f1_table(
    relevances: Sequence[np.ndarray],
    gold_masks: Sequence[np.ndarray],
    ks: Sequence[int] = DEFAULT_KS,
    average: Literal["macro", "micro"] = "macro",
) -> dict[int, dict[str, float]]:
    """``{k: {"precision", "recall", "f1"}}`` of the top-k-word rationales over all documents."""
    if len(relevances) != len(gold_masks):
        raise ValueError(f"{len(relevances)} relevance arrays but {len(gold_masks)} gold masks")
    golds = [np.asarray(g, dtype=bool) for g in gold_masks]
    for i, (rel, gold) in enumerate(zip(relevances, golds)):
        if np.shape(rel) != gold.shape:
            raise ValueError(f"document {i}: relevance shape {np.shape(rel)} != gold shape {gold.shape}")
    table = {}
    for k in ks:
        predicted = [top_k_mask(rel, k) for rel in relevances]
        table[k] = _average(predicted, golds) if average == "macro" else _pooled(predicted, golds)
    return table


def _average(predicted: list[np.ndarray], golds: list[np.ndarray]) -> dict[str, float]:
    scores = [document_prf(p, g) for p, g in zip(predicted, golds) if p.any() or g.any()]
    if not scores:
        raise ValueError("no document has a gold or a predicted rationale token")
    precision, recall, f1 = np.mean(scores, axis=0)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def _pooled(predicted: list[np.ndarray], golds: list[np.ndarray]) -> dict[str, float]:
    hits = sum(int(np.sum(p & g)) for p, g in zip(predicted, golds))
    n_pred, n_gold = sum(int(p.sum()) for p in predicted), sum(int(g.sum()) for g in golds)
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_gold if n_gold else 0.0
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def word_relevance(
    subword_relevance: np.ndarray,
    word_ids: Sequence[int | None],
    n_words: int | None = None,
    reduce: Literal["max", "sum"] = "max",
) -> np.ndarray:
    """Per-word scores from per-sub-word scores (the paper's code takes the max).

    ``word_ids[i]`` is the word of sub-word ``i``, or None / -1 for special tokens.
    ``n_words`` defaults to the largest word id + 1; words without sub-words get NaN.
    """
    ids = np.array([-1 if w is None else w for w in word_ids], dtype=int)
    scores = np.asarray(subword_relevance, dtype=float)
    if scores.shape != ids.shape:
        raise ValueError(f"{scores.size} sub-word scores for {len(ids)} word ids")
    keep = ids >= 0
    ids, scores = ids[keep], scores[keep]
    size = n_words if n_words is not None else int(ids.max(initial=-1)) + 1
    if reduce == "max":
        out = np.full(size, -np.inf)
        np.maximum.at(out, ids, scores)
    elif reduce == "sum":
        out = np.zeros(size)
        np.add.at(out, ids, scores)
    else:
        raise ValueError(f"reduce must be 'max' or 'sum', not {reduce!r}")
    out[np.bincount(ids, minlength=size)[:size] == 0] = np.nan
    return out


@dataclass(frozen=True)
class WordEncoding:
    input_ids: list[int]
    word_ids: np.ndarray  # word of each sub-word, -1 for special tokens
    char_offsets: np.ndarray  # (n_subwords, 2) spans in " ".join(words); (0, 0) for specials


def encode_words(tokenizer, words: Sequence[str], max_length: int = 512) -> WordEncoding:
    """Tokenizes pre-split words with a fast HF tokenizer, keeping sub-word -> word links.

    Sequences longer than ``max_length`` are cut at the end, so trailing words get no
    sub-words (``word_relevance`` then gives them NaN).
    """
    if not tokenizer.is_fast:
        raise TypeError("encode_words needs a fast (Rust) tokenizer for word ids and offsets")
    enc = tokenizer(list(words), is_split_into_words=True, truncation=True,
                    max_length=max_length, return_offsets_mapping=True)
    word_ids = np.array([-1 if w is None else w for w in enc.word_ids()], dtype=int)
    # With is_split_into_words the offsets are relative to each word; shift them to the
    # word's start in the space-joined document.
    starts = np.cumsum([0] + [len(w) + 1 for w in words])[:-1]
    offsets = np.array(enc["offset_mapping"], dtype=int).reshape(-1, 2)
    offsets[word_ids >= 0] += starts[word_ids[word_ids >= 0], None]
    return WordEncoding(enc["input_ids"], word_ids, offsets)
