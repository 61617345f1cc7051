"""Explaining raw text: tokenize, explain, and map sub-word relevance back to words.

``explain_text`` handles batching with padding, long inputs (truncation with a warning, or
overlapping windows whose relevances are merged) and sub-word -> word aggregation with
character offsets into the original text.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError


@dataclass
class Word:
    text: str
    start: int           # character offsets into the original text
    end: int
    relevance: float


@dataclass
class TextExplanation:
    text: str
    method: str
    target: int
    label: str
    probabilities: list[float]
    tokens: list[str]                    # sub-word tokens, special tokens included
    token_relevance: np.ndarray          # one score per token
    token_offsets: np.ndarray            # [T, 2] character spans ((0, 0) for special tokens)
    special: np.ndarray                  # [T] bool
    words: list[Word] = field(default_factory=list)
    truncated_tokens: int = 0            # tokens beyond the model's length that were not explained

    def to_json(self) -> dict:
        return {
            "text": self.text, "method": self.method, "target": self.target, "label": self.label,
            "probabilities": self.probabilities, "truncated_tokens": self.truncated_tokens,
            "words": [{"text": w.text, "start": w.start, "end": w.end, "relevance": w.relevance} for w in self.words],
            "tokens": [{"token": t, "start": int(s), "end": int(e), "relevance": float(r), "special": bool(sp)}
                       for t, (s, e), r, sp in zip(self.tokens, self.token_offsets, self.token_relevance, self.special)],
        }

    def to_html(self, **kwargs) -> str:
        from .views import to_html
        return to_html([self], **kwargs)

    def to_ansi(self) -> str:
        from .views import to_ansi
        return to_ansi(self)


def words_from_tokens(text: str, word_ids: Sequence[Optional[int]], offsets: np.ndarray, relevance: np.ndarray,
                      aggregate: Literal["max", "sum"] = "max") -> list[Word]:
    """Group sub-words by word id: a word's span covers its sub-words, its relevance is the
    max (the paper's pipeline) or the sum of theirs. Special tokens (id None) are skipped."""
    if aggregate not in ("max", "sum"):
        raise ValueError(f"aggregate must be 'max' or 'sum', not {aggregate!r}")
    groups: dict[int, list[int]] = {}
    for index, word in enumerate(word_ids):
        if word is not None:
            groups.setdefault(word, []).append(index)
    words = []
    for word in sorted(groups):
        members = groups[word]
        start, end = int(offsets[members[0]][0]), int(offsets[members[-1]][1])
        scores = relevance[members]
        value = float(scores.max() if aggregate == "max" else scores.sum())
        words.append(Word(text[start:end], start, end, value))
    return words


def _max_length(model, tokenizer) -> int:
    limit = getattr(model.config, "max_position_embeddings", 512)
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta"):
        limit -= (model.config.pad_token_id or 0) + 1        # positions start after padding_idx
    model_max = getattr(tokenizer, "model_max_length", limit)
    return int(min(limit, model_max if model_max and model_max < 1e6 else limit))


def explain_text(explainer, tokenizer, texts: str | Sequence[str], method: str = "transformer_attribution",
                 target=None, *, aggregate: Literal["max", "sum"] = "max",
                 long_text: Literal["truncate", "windows"] = "truncate", window_stride: Optional[int] = None,
                 batch_size: int = 16, **options) -> list[TextExplanation]:
    """Explain raw texts with a Hugging Face text classifier and its (fast) tokenizer.

    Parameters
    ----------
    explainer : relprop.Explainer
        An explainer of a supported text classifier.
    tokenizer : transformers.PreTrainedTokenizerFast
        The model's tokenizer (a fast one: offsets and word ids map sub-words back to words).
    texts : str or sequence of str
        One text or several; several are explained in padded batches of ``batch_size``.
    method : str
        One of `relprop.methods()`.
    target : None, int, str, or a sequence of them
        None explains each text's predicted class; a class index or label name
        (``config.id2label``, e.g. ``"positive"``) the same class for every text; or one per text.
    aggregate : {"max", "sum"}
        How a word's relevance is made from its sub-words' (the paper's pipeline: max).
    long_text : {"truncate", "windows"}
        ``"truncate"`` explains the first ``max_length`` tokens and warns; ``"windows"``
        explains overlapping windows of ``max_length`` tokens (stride ``window_stride``,
        default half a window), each with the same target, and averages each token's
        relevance over the windows that contain it (the logits are the windows' mean).
    window_stride : int, optional
        Tokens between window starts, with ``long_text="windows"``.
    batch_size : int
        Texts per explanation pass.
    **options
        The method's options.

    Returns
    -------
    list of TextExplanation
        One per text: words with character offsets and relevance, the sub-word tokens and
        their relevance, the explained class and the class probabilities.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("explain_text needs a fast tokenizer (offsets and word ids); load it with use_fast=True")
    if long_text not in ("truncate", "windows"):
        raise ValueError(f"long_text must be 'truncate' or 'windows', not {long_text!r}")
    targets = _per_text_targets(explainer, target, len(texts))
    max_length = _max_length(explainer.model, tokenizer)
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        chunk_targets = targets[start:start + batch_size]
        if long_text == "truncate":
            results += _explain_truncated(explainer, tokenizer, chunk, chunk_targets, method, max_length, aggregate, options)
        else:
            for text, tgt in zip(chunk, chunk_targets):
                results.append(_explain_windows(explainer, tokenizer, text, tgt, method, max_length,
                                                window_stride, aggregate, options))
    return results


def _per_text_targets(explainer, target, count: int) -> list[Optional[int]]:
    """One class index (or None: the prediction) per text, from an index, a label name, or one
    of those per text."""
    if isinstance(target, torch.Tensor) and target.dim() == 0:
        target = target.item()
    if target is None or isinstance(target, (str, numbers.Integral)):
        return [None if target is None else explainer.class_index(target)] * count
    try:
        values = [None if t is None else explainer.class_index(t.item() if isinstance(t, torch.Tensor) else t)
                  for t in target]
    except TypeError:
        raise InputError(f"target must be None, a class index, a label name, or one of those per text; "
                         f"got {type(target).__name__}") from None
    if len(values) != count:
        raise InputError(f"{len(values)} targets for {count} texts")
    return values


def _label(explainer, index: int) -> str:
    return explainer.labels.get(index, str(index))


def _explain_truncated(explainer, tokenizer, texts, targets, method, max_length, aggregate, options):
    full = tokenizer(texts, add_special_tokens=True)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                        return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
    dropped = [max(0, len(ids) - max_length) for ids in full["input_ids"]]
    for text, n in zip(texts, dropped):
        if n:
            warnings.warn(f"text of {n + max_length} tokens truncated to the model's {max_length}; the last {n} "
                          f"tokens are not explained (use long_text='windows' to explain all of it)", stacklevel=3)
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
    result = _explain_batch(explainer, inputs, method, targets, options)
    out = []
    for i, text in enumerate(texts):
        length = int(encoded["attention_mask"][i].sum())
        out.append(_assemble(explainer, tokenizer, text, method, int(result.target[i]), result.logits[i],
                             encoded["input_ids"][i, :length].tolist(), encoded["offset_mapping"][i, :length].numpy(),
                             encoded["special_tokens_mask"][i, :length].numpy().astype(bool),
                             encoded.word_ids(i)[:length], result.relevance[i, :length].numpy(), aggregate, dropped[i]))
    return out


def _explain_batch(explainer, inputs, method, targets, options):
    target = None if all(t is None for t in targets) else targets
    if target is not None and any(t is None for t in targets):
        predicted = explainer.logits(inputs).argmax(1).tolist()
        target = [p if t is None else t for p, t in zip(predicted, targets)]
    return explainer.explain(inputs, method, target=target, **options)


def _assemble(explainer, tokenizer, text, method, target, logits, ids, offsets, special, word_ids, relevance,
              aggregate, dropped):
    probabilities = logits.double().softmax(-1).tolist()
    word_ids = [None if s else w for w, s in zip(word_ids, special)]
    return TextExplanation(text=text, method=method, target=target, label=_label(explainer, target),
                           probabilities=probabilities, tokens=tokenizer.convert_ids_to_tokens(ids),
                           token_relevance=relevance, token_offsets=offsets, special=special,
                           words=words_from_tokens(text, word_ids, offsets, relevance, aggregate),
                           truncated_tokens=dropped)


def _explain_windows(explainer, tokenizer, text, target, method, max_length, stride, aggregate, options):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets, word_ids = encoded["input_ids"], np.array(encoded["offset_mapping"]).reshape(-1, 2), encoded.word_ids()
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise InputError("long_text='windows' needs a tokenizer with [CLS]/[SEP] (or <s>/</s>) tokens")
    body = max_length - 2
    stride = stride or max(1, body // 2)
    if not 0 < stride <= body:
        raise InputError(f"window_stride must be in 1..{body}")
    starts = [0]
    while starts[-1] + body < len(ids):                 # the last window ends at the text's end
        starts.append(min(starts[-1] + stride, len(ids) - body))
    windows = [[cls_id] + ids[s:s + body] + [sep_id] for s in starts]
    width = max(len(w) for w in windows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([w + [pad] * (width - len(w)) for w in windows])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in windows])
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    logits = explainer.logits(inputs).mean(0)
    chosen = int(logits.argmax()) if target is None else target
    result = explainer.explain(inputs, method, target=chosen, **options)
    total, count = np.zeros(len(ids)), np.zeros(len(ids))
    for row, s in enumerate(starts):
        n = min(body, len(ids) - s)
        total[s:s + n] += result.relevance[row, 1:1 + n].double().numpy()
        count[s:s + n] += 1
    relevance = total / np.maximum(count, 1)
    return _assemble(explainer, tokenizer, text, method, chosen, logits, ids, offsets,
                     np.zeros(len(ids), dtype=bool), word_ids, relevance, aggregate, 0)

