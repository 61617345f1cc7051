"""Counterfactual explanations from a relevance map: the smallest set of image patches, or of
words, whose removal changes the model's decision.

The search (``search_removal``) works on *units* (patches, words) ranked by the map, most
relevant first:

1. **Greedy in the map's order.** Remove the 0, 1, 2, ... most relevant units until the
   decision flips; ``greedy`` is that count (what the benchmark reports as a fraction of the
   input). The candidates are forwarded in batches (8, 16, 32, ... up to ``batch_size`` at a
   time), so an early flip costs few forwards.
2. **Prune.** A removed unit whose restoration keeps the flip is not needed. Each round
   forwards every single restoration of the current set in one batch, then restores the
   dispensable units cumulatively, least relevant first, as far as the flip holds (a second
   batch). Rounds repeat until no single unit can be restored: the result is *1-minimal*
   (restoring any one of its units undoes the flip), not necessarily the smallest set of all.

"Flip" means the top-1 class is no longer the explained class (``to=None``), or that class
``to`` is the top-1 class ("make a chosen class win"). When removing every unit does not
flip the decision there is no counterfactual (``flipped=False``).

Removal: an image patch is replaced by a constant (0 in [0, 1] image space, the perturbation
test's default) or by the image's blurred copy, everything else kept; a word is deleted from
the token sequence (all of its sub-word tokens; special tokens stay), so the model reads the
sentence without it. Units for text are words, as in the paper's text pipeline (a word's
relevance is the max over its sub-words).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import InputError

#: forwards(removed [K, n] bool) -> logits [K, classes]
Forward = Callable[[np.ndarray], torch.Tensor]
FIRST_CHUNK = 8


def removal_order(scores: np.ndarray) -> np.ndarray:
    """Unit indices from most to least relevant; equal scores in index order (stable)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(scores).all():
        raise InputError("the relevance map has NaN or infinite values: no removal order")
    return np.argsort(-scores, kind="stable")


@dataclass
class Search:
    """Result of `search_removal`. ``removed``: the pruned set, in the map's order."""

    n_units: int
    order: list[int]
    flipped: bool
    greedy: Optional[int]           # units removed in the map's order when the decision first flipped
    removed: list[int]              # pruned set ([] when not flipped)
    original_class: int
    original_probabilities: list[float]
    new_class: int                  # top-1 class with ``removed`` removed (with everything removed if not flipped)
    new_probabilities: list[float]
    forwards: int                   # candidate inputs forwarded

    @property
    def greedy_fraction(self) -> float:
        """Fraction of the units removed in map order before the flip (1.0 when it never flips)."""
        return 1.0 if self.greedy is None else self.greedy / self.n_units

    @property
    def removed_fraction(self) -> float:
        """Fraction of the units in the pruned set (1.0 when it never flips)."""
        return len(self.removed) / self.n_units if self.flipped else 1.0

    def to_json(self) -> dict:
        return {"units": self.n_units, "flipped": self.flipped, "greedy": self.greedy, "removed": self.removed,
                "original_class": self.original_class, "original_probabilities": self.original_probabilities,
                "new_class": self.new_class, "new_probabilities": self.new_probabilities,
                "forwards": self.forwards}


def search_removal(scores: np.ndarray, forward: Forward, explained: int, to: Optional[int] = None,
                   batch_size: int = 64, prune: bool = True) -> Search:
    """Greedy-then-pruned removal search over ``len(scores)`` units (see the module notes).

    Parameters
    ----------
    scores : one relevance score per unit; higher is removed first.
    forward : removed ([K, n] bool, True = unit removed) -> logits [K, classes].
    explained : the explained class; without ``to`` the decision flips when it stops being top-1.
    to : the class that must become top-1 instead.
    batch_size : most candidates per ``forward`` call.
    prune : False keeps the greedy prefix as it is.
    """
    order = removal_order(scores)
    n = order.size
    if n == 0:
        raise InputError("nothing to remove: the input has no units")
    count = [0]

    def run(rows: np.ndarray) -> torch.Tensor:
        count[0] += len(rows)
        return torch.cat([forward(rows[i:i + batch_size]).detach().float().cpu()
                          for i in range(0, len(rows), batch_size)])

    def flips(logits: torch.Tensor) -> np.ndarray:
        top = logits.argmax(-1).numpy()
        return top == to if to is not None else top != explained

    def prefix_rows(ks: Sequence[int]) -> np.ndarray:
        rows = np.zeros((len(ks), n), dtype=bool)
        for row, k in enumerate(ks):
            rows[row, order[:k]] = True
        return rows

    original = run(np.zeros((1, n), dtype=bool))[0]
    greedy, size, k = None, FIRST_CHUNK, 0
    while k <= n and greedy is None:                      # k = 0 too: already flipped needs no removal
        ks = list(range(k, min(n, k + size - 1) + 1))
        hit = np.flatnonzero(flips(run(prefix_rows(ks))))
        if hit.size:
            greedy = ks[int(hit[0])]
        k, size = ks[-1] + 1, min(2 * size, batch_size)
    removed = list(order[:greedy]) if greedy is not None else []
    if greedy is not None and prune:
        removed = _prune(removed, n, run, flips)
    final = np.zeros((1, n), dtype=bool)
    final[0, removed if greedy is not None else order] = True
    after = run(final)[0]
    rank = {int(u): i for i, u in enumerate(order)}
    return Search(n_units=n, order=[int(u) for u in order], flipped=greedy is not None, greedy=greedy,
                  removed=sorted((int(u) for u in removed), key=rank.__getitem__) if greedy is not None else [],
                  original_class=int(original.argmax()), original_probabilities=original.double().softmax(-1).tolist(),
                  new_class=int(after.argmax()), new_probabilities=after.double().softmax(-1).tolist(),
                  forwards=count[0])


def _prune(removed: list, n: int, run: Callable[[np.ndarray], torch.Tensor],
           flips: Callable[[torch.Tensor], np.ndarray]) -> list:
    """Restore units of ``removed`` (most relevant first) while the flip holds, until no single
    unit can be restored (1-minimal)."""
    current = list(removed)
    while current:
        base = np.zeros(n, dtype=bool)
        base[current] = True
        singles = np.repeat(base[None], len(current), axis=0)
        singles[np.arange(len(current)), current] = False
        spare = [u for u, ok in zip(current, flips(run(singles))) if ok]
        if not spare:
            break
        spare.reverse()                                    # least relevant first
        cumulative = np.repeat(base[None], len(spare), axis=0)
        for row in range(len(spare)):
            cumulative[row:, spare[row]] = False
        still = flips(run(cumulative))
        keep_going = len(spare) if still.all() else int(np.argmin(still))  # up to the first failure
        if keep_going == 0:          # only if batched forwards disagree on a near-tie: keep the flip
            break
        restored = set(spare[:keep_going])
        current = [u for u in current if u not in restored]
    return current


# ------------------------------------------------------------------ images
def patch_scores(explanation: Any, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] one score per patch of the model's ``grid``: the token-level map as it is, a
    pixel-level map (``lrp``) averaged over each patch (the perturbation test's patch ranking)."""
    from .eval.perturbation import PerturbationConfig, ranking_scores

    height, width = image_size
    if height % grid[0] or width % grid[1] or height // grid[0] != width // grid[1]:
        raise InputError(f"a {height}x{width} image does not split into square patches of a {grid[0]}x{grid[1]} grid")
    return ranking_scores(explanation, PerturbationConfig(image_size=image_size, rank="patch",
                                                          patch_size=height // grid[0]))


def patch_forward(logits_of: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                  replacement: torch.Tensor, grid: tuple[int, int]) -> Forward:
    """``Forward`` over the patches of one [3, H, W] image in [0, 1]: removed patches take
    ``replacement``'s pixels. ``logits_of`` gets the [K, 3, H, W] images in [0, 1]."""
    from .eval.perturbation import expand_cells

    def forward(removed: np.ndarray) -> torch.Tensor:
        cells = torch.from_numpy(removed).to(image.device).reshape(len(removed), 1, *grid)
        pixels = expand_cells(cells, tuple(image.shape[-2:]))
        with torch.no_grad():
            return logits_of(torch.where(pixels, replacement, image))

    return forward


@dataclass
class ImageCounterfactual:
    search: Search
    grid: tuple[int, int]
    scores: np.ndarray                                   # [h, w] the ranking scores

    def removed_mask(self, image_size: tuple[int, int]) -> np.ndarray:
        """Bool [H, W]: the pixels of the removed patches."""
        from .eval.perturbation import expand_cells

        cells = torch.zeros(self.grid[0] * self.grid[1], dtype=torch.bool)
        cells[self.search.removed] = True
        return expand_cells(cells.reshape(self.grid), image_size).numpy()


def image_counterfactuals(explainer: Any, images: torch.Tensor, normalization: Callable[[torch.Tensor], torch.Tensor],
                          method: str = "transformer_attribution", target: Any = None, to: Optional[int] = None,
                          replacement: Union[float, torch.Tensor] = 0.0, batch_size: int = 64, prune: bool = True,
                          **options: Any) -> list[ImageCounterfactual]:
    """Counterfactuals of a [B, 3, H, W] batch of images in [0, 1] (``normalization`` turns
    them into model inputs): per image, the patches to remove, ranked by ``method``'s map of
    ``target`` (default: the predicted class). ``replacement``: a value in [0, 1] or
    [B, 3, H, W] images (e.g. blurred copies)."""
    size = tuple(images.shape[-2:])
    result = explainer.explain(normalization(images), method=method, target=target, **options)
    grid = result.grid or _model_grid(explainer, size)
    scores = patch_scores(result, size, grid).cpu()
    fill = torch.as_tensor(replacement, dtype=images.dtype, device=images.device).expand_as(images)
    out = []
    for i in range(len(images)):
        forward = patch_forward(lambda x: explainer.logits(normalization(x)), images[i], fill[i], grid)
        search = search_removal(scores[i].flatten().numpy(), forward, int(result.target[i]), to, batch_size, prune)
        out.append(ImageCounterfactual(search, grid, scores[i].numpy()))
    return out


def _model_grid(explainer: Any, size: tuple[int, int]) -> tuple[int, int]:
    from .inputs import image_geometry

    _, patch, _ = image_geometry(explainer.model, explainer.family)
    return size[0] // patch[0], size[1] // patch[1]



# -------------------------------------------------------------------- text
@dataclass
class TextCounterfactual:
    """A text's counterfactual in words: ``removed`` indexes ``explanation.words``."""

    explanation: Any                                    # relprop.text.explain.TextExplanation
    search: Search
    labels: dict = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        return [w.text for w in self.explanation.words]

    @property
    def removed_words(self) -> list[str]:
        return [self.explanation.words[i].text for i in self.search.removed]

    def new_text(self) -> str:
        """The text with the removed words deleted (runs of whitespace made one space)."""
        return " ".join(self._marked(lambda word: "").split())

    def struck(self, style: str = "plain") -> str:
        """The text with removed words struck out: ``~~word~~`` (plain) or ANSI strikethrough."""
        mark = (lambda w: f"\x1b[9;31m{w}\x1b[0m") if style == "ansi" else (lambda w: f"~~{w}~~")
        return self._marked(mark)

    def _marked(self, mark: Callable[[str], str]) -> str:
        text, gone = self.explanation.text, set(self.search.removed)
        pieces, cursor = [], 0
        for i, word in enumerate(self.explanation.words):
            pieces += [text[cursor:word.start], mark(word.text) if i in gone else word.text]
            cursor = word.end
        return "".join(pieces) + text[cursor:]

    def _label(self, cls: int, probabilities: Sequence[float]) -> str:
        return f"{self.labels.get(cls, str(cls))} ({probabilities[cls]:.2f})"

    def sentence(self) -> str:
        """The counterfactual in words."""
        s = self.search
        before = self._label(s.original_class, s.original_probabilities)
        if not s.flipped:
            return (f"No counterfactual: even without all {s.n_units} words the model says "
                    f"{self._label(s.new_class, s.new_probabilities)}, not another class than {before}.")
        if not s.removed:
            return f"Nothing to remove: the model already says {self._label(s.new_class, s.new_probabilities)}."
        quoted = [f"'{w}'" for w in self.removed_words]
        listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
        return (f"Without {listed} ({len(quoted)} of {s.n_units} words) the model says "
                f"{self._label(s.new_class, s.new_probabilities)} instead of {before}.")

    def to_json(self) -> dict:
        return {"text": self.explanation.text, "method": self.explanation.method,
                "explained_class": self.explanation.target, "words": self.words,
                "word_relevance": [w.relevance for w in self.explanation.words],
                "removed_words": self.removed_words, "new_text": self.new_text(), "sentence": self.sentence(),
                "labels": {str(k): v for k, v in self.labels.items()}, **self.search.to_json()}


def word_forward(explainer: Any, tokenizer: Any, text: str, max_length: int) -> tuple[Forward, int]:
    """``Forward`` over the words of ``text`` (deleting a removed word's tokens) and the number
    of words (those within the model's length)."""
    encoded = tokenizer(text, truncation=True, max_length=max_length)
    ids, word_ids = encoded["input_ids"], encoded.word_ids()
    special = set(tokenizer.all_special_ids)
    words = sorted({w for w, t in zip(word_ids, ids) if w is not None and t not in special})
    unit_of = {w: i for i, w in enumerate(words)}
    units = np.array([unit_of.get(w, -1) if w is not None and t not in special else -1
                      for w, t in zip(word_ids, ids)])
    pad = tokenizer.pad_token_id or 0

    def forward(removed: np.ndarray) -> torch.Tensor:
        kept = [[t for t, u in zip(ids, units) if u < 0 or not row[u]] for row in removed]
        width = max(len(k) for k in kept)
        batch = {"input_ids": torch.tensor([k + [pad] * (width - len(k)) for k in kept]),
                 "attention_mask": torch.tensor([[1] * len(k) + [0] * (width - len(k)) for k in kept])}
        if "token_type_ids" in encoded:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return explainer.logits(batch)

    return forward, len(words)


def text_counterfactuals(explainer: Any, tokenizer: Any, texts: Union[str, Sequence[str]],
                         method: str = "transformer_attribution", target: Any = None, to: Optional[int] = None,
                         batch_size: int = 64, prune: bool = True, scores: Optional[Sequence[np.ndarray]] = None,
                         **options: Any) -> list[TextCounterfactual]:
    """Counterfactuals of texts: per text, the words to delete, ranked by ``method``'s word
    relevance for ``target`` (default: the prediction). ``scores`` (one array per text, one
    score per word) replaces the map's order, e.g. a random baseline."""
    from .text.explain import _max_length, explain_text

    texts = [texts] if isinstance(texts, str) else list(texts)
    explanations = explain_text(explainer, tokenizer, texts, method, target=target, **options)
    max_length = _max_length(explainer.model, tokenizer)
    out = []
    for i, exp in enumerate(explanations):
        forward, n_words = word_forward(explainer, tokenizer, exp.text, max_length)
        if n_words != len(exp.words):
            raise InputError(f"{n_words} words to remove but {len(exp.words)} explained in {exp.text[:40]!r}")
        ranking = np.array([w.relevance for w in exp.words]) if scores is None else np.asarray(scores[i])
        search = search_removal(ranking, forward, exp.target, to, batch_size, prune)
        out.append(TextCounterfactual(exp, search, dict(explainer.labels)))
    return out
