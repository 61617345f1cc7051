"""ERASER token-level rationale agreement: top-k words by relevance vs. human rationales.

As in the paper's movie-review experiment, the predicted rationale of a document is its k
most relevant words. Scoring follows ERASER's ``token_prf`` (``score_hard_rationale_predictions``
on token-level rationales): per document, precision = |pred & gold| / |pred| and
recall = |pred & gold| / |gold| (0 when the denominator is 0), F1 = 0 if P or R is 0, else their
harmonic mean. "macro" averages the per-document P, R and F1 separately over documents (so
macro F1 is not the F1 of macro P/R); a document with neither gold nor predicted tokens is not
counted. "micro" pools the counts.

The selection follows the authors' script (``BERT_rationale_benchmark/models/pipeline/
bert_pipeline.py`` in hila-chefer/Transformer-Explainability), which for each test document

1. clamps the word-piece relevance at 0 (``cam_target.clamp(min=0)``, line 552);
2. gives each whitespace word the max over its word pieces (line 563,
   ``scores_per_word_from_scores_per_token``; words cut off at 512 pieces get no score);
3. for k = 5, 10, ..., 80 (``range(5, 85, 5)``, lines 453 and 567) takes ``cam.topk(k)``,
   appending the indices (line 569) to a list created once per document (line 566), so the
   prediction written for k also holds every word chosen for a smaller k (lines 570-582).

Defaults here: ``clip_negative=True`` and ``DEFAULT_KS`` = 5, 10, ..., 80 (steps 1 and 3).
Because max and clamping at 0 commute (max_i max(x_i, 0) = max(max_i x_i, 0)), clipping the
max-aggregated word scores, as this module does, selects exactly the words the authors' piece-
level clamp selects. With ``word_relevance(..., reduce="sum")`` the clip applies to the sum;
clip the pieces yourself first (``np.maximum(pieces, 0)``) for the other order.

Ties. The clip makes every non-positive word tie at 0, so whenever a document has fewer than k
positive words, the tie rule decides which zero-scored words fill the top k. ``torch.topk``
does not specify which of tied elements it returns (PyTorch's documentation: "the indices of
tied elements are not guaranteed to be stable"); on CPU it returns an implementation-dependent
subset, and the subset for k = 5 need not lie inside the one for k = 10. relprop instead
ranks by a stable sort on decreasing score (``ties="first"``): a tie goes to the word that comes
first in the document, the same for every k, so the top-j words are always among the top-k
(j < k). ``ties="torch"`` calls ``torch.topk`` on float32 scores as the authors' script does, to
reproduce its selection (only as stable as ``torch.topk`` itself across versions and devices).

Carry-over. ``carry_over=True`` keeps the words chosen for every smaller k in ``ks`` in the
prediction at k, the quirk of the authors' loop (the prediction may then hold more than k
words). It is off by default: it is an artefact, not part of the protocol the paper
describes. Under ``ties="first"`` the selections are nested, so it changes nothing; under
``ties="torch"`` it can add tied (typically zero-scored) words.
For positive, untied scores every setting selects the same words.

Relevance arrays hold one score per document word; NaN marks words without a score (e.g.
cut off by the model's length limit), which are never selected but still count as gold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

DEFAULT_KS = tuple(range(5, 85, 5))
TieRule = Literal["first", "torch"]


def top_k_mask(relevance: np.ndarray, k: int, ties: TieRule = "first") -> np.ndarray:
    """Boolean mask of the k highest-scoring words (all scored words if fewer); NaN never.

    Parameters
    ----------
    relevance : one score per word, NaN for words without a score.
    k : number of words to select.
    ties : "first" gives a tie to the word that comes first in the document; "torch" keeps
        whichever tied words ``torch.topk`` returns on float32 scores (the authors' call).
    """
    relevance = np.asarray(relevance, dtype=float)
    scored = np.flatnonzero(~np.isnan(relevance))
    k = min(k, scored.size)  # the authors' topk would fail on documents shorter than k
    if ties == "first":
        chosen = scored[np.argsort(-relevance[scored], kind="stable")[:k]]
    elif ties == "torch":
        import torch

        chosen = scored[torch.topk(torch.from_numpy(relevance[scored]).float(), k).indices.numpy()]
    else:
        raise ValueError(f"ties must be 'first' or 'torch', not {ties!r}")
    mask = np.zeros(relevance.shape, dtype=bool)
    mask[chosen] = True
    return mask


def rationale_masks(
    relevance: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    clip_negative: bool = True,
    carry_over: bool = False,
    ties: TieRule = "first",
) -> dict[int, np.ndarray]:
    """One document's predicted rationale (boolean word mask) for each k.

    Parameters
    ----------
    relevance : one score per word, NaN for words without a score.
    ks : the rationale sizes.
    clip_negative : rank ``max(score, 0)``, as the authors do (negative words then tie at 0).
    carry_over : the prediction at k also keeps the words chosen for every smaller k in ``ks``
        (the authors' loop quirk; a no-op under ``ties="first"``).
    ties : see `top_k_mask`.

    Returns
    -------
    ``{k: mask}`` in the order of ``ks``.
    """
    scores = np.asarray(relevance, dtype=float)
    if clip_negative:
        scores = np.maximum(scores, 0.0)  # NaN stays NaN
    masks = {k: top_k_mask(scores, k, ties) for k in ks}
    if carry_over:
        masks = {k: np.logical_or.reduce([masks[j] for j in ks if j <= k]) for k in ks}
    return masks


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
    *,
    clip_negative: bool = True,
    carry_over: bool = False,
    ties: TieRule = "first",
) -> dict[int, dict[str, float]]:
    """``{k: {"precision", "recall", "f1"}}`` of the top-k-word rationales over all documents.

    Parameters
    ----------
    relevances : per document, one score per word (NaN: no score).
    gold_masks : per document, the human rationale as a boolean word mask.
    ks : the rationale sizes; default 5, 10, ..., 80 as the authors.
    average : "macro" (ERASER's instance macro average) or "micro" (pooled counts).
    clip_negative, carry_over, ties : the selection protocol, see `rationale_masks`; the
        defaults are the authors' protocol with relprop's deterministic tie rule.
    """
    if len(relevances) != len(gold_masks):
        raise ValueError(f"{len(relevances)} relevance arrays but {len(gold_masks)} gold masks")
    golds = [np.asarray(g, dtype=bool) for g in gold_masks]
    for i, (rel, gold) in enumerate(zip(relevances, golds)):
        if np.shape(rel) != gold.shape:
            raise ValueError(f"document {i}: relevance shape {np.shape(rel)} != gold shape {gold.shape}")
    selections = [rationale_masks(rel, ks, clip_negative=clip_negative, carry_over=carry_over, ties=ties)
                  for rel in relevances]
    score = _average if average == "macro" else _pooled
    return {k: score([masks[k] for masks in selections], golds) for k in ks}


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
