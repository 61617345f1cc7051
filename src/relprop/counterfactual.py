"""Counterfactual explanations from a relevance map: the smallest set of image patches, or of
words, whose removal changes the model's decision.

The search (``search_removal``) works on *units* (patches, words) ranked by the map, most
relevant first:

1. **Greedy in the map's order.** Remove the 0, 1, 2, ... most relevant units until the
   decision flips; ``greedy`` is that count (what the benchmark reports as a fraction of the
   input). The prefixes are tried in growing chunks (4, 4, 8, 8, 16, 16, ...), so an early
   flip costs few forwards and a late one few rounds.
2. **Prune.** A removed unit whose restoration keeps the flip is not needed. Each round
   forwards every single restoration of the current set in one batch, then restores the
   dispensable units cumulatively, least relevant first, as far as the flip holds (a second
   batch). Rounds repeat until no single unit can be restored: the result is *1-minimal*
   (restoring any one of its units undoes the flip), not necessarily the smallest set of all.

``search_removals`` runs the searches of several samples in step and forwards the candidates
of all of them together, ``batch_size`` at a time (a batch of images or texts costs a few
large forwards instead of many small ones).

"Flip" means the top-1 class is no longer the explained class (``to=None``), or that class
``to`` is the top-1 class ("make a chosen class win"). When no prefix of the map's order flips
the decision (removing everything included) there is no counterfactual (``flipped=False``).
The decision need not change monotonically (a prefix may flip it and a longer one flip it
back), so whether a sample flips at all depends on the order, not only on the input.

Removal: an image patch is replaced by a constant (0 in [0, 1] image space, the perturbation
test's default) or by the image's blurred copy, everything else kept; a word is deleted from
the token sequence (all of its sub-word tokens; special tokens stay), so the model reads the
sentence without it. Units for text are words, as in the paper's text pipeline (a word's
relevance is the max over its sub-words).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional, Sequence, Union

import numpy as np
import torch

from .errors import InputError

#: forwards(removed [K, n] bool) -> logits [K, classes]
Forward = Callable[[np.ndarray], torch.Tensor]
FIRST_CHUNK = 4


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


def search_removal(scores: np.ndarray, forward: Forward, explained: Optional[int] = None, to: Optional[int] = None,
                   batch_size: int = 64, prune: bool = True) -> Search:
    """Greedy-then-pruned removal search over ``len(scores)`` units (see the module notes).

    Parameters
    ----------
    scores : one relevance score per unit; higher is removed first.
    forward : removed ([K, n] bool, True = unit removed) -> logits [K, classes].
    explained : the explained class (default: the top-1 class of the whole input); without ``to``
        the decision flips when it stops being top-1.
    to : the class that must become top-1 instead.
    batch_size : most candidates per ``forward`` call.
    prune : False keeps the greedy prefix as it is.
    """
    def forward_many(requests: Sequence[tuple[int, np.ndarray]]) -> torch.Tensor:
        return forward(np.stack([row for _, row in requests]))

    return search_removals([scores], forward_many, [explained], to, batch_size, prune)[0]


#: forward(requests: [(sample index, removed [n_sample] bool), ...]) -> logits [len(requests), classes]
ManyForward = Callable[[Sequence[tuple[int, np.ndarray]]], torch.Tensor]


def search_removals(scores: Sequence[np.ndarray], forward: ManyForward, explained: Sequence[Optional[int]],
                    to: Optional[int] = None, batch_size: int = 64, prune: bool = True) -> list[Search]:
    """`search_removal` for several samples at once: their searches run in step, and the
    candidates of all samples go through ``forward`` together, ``batch_size`` at a time."""
    steps = [_search(np.asarray(s), e, to, prune) for s, e in zip(scores, explained)]
    results: list[Optional[Search]] = [None] * len(steps)
    pending = {i: next(step) for i, step in enumerate(steps)}
    while pending:
        requests = [(i, row) for i, rows in pending.items() for row in rows]
        logits = torch.cat([forward(requests[j:j + batch_size]).detach().float().cpu()
                            for j in range(0, len(requests), batch_size)])
        asked, offset = pending, 0
        pending = {}
        for i, rows in asked.items():
            try:
                pending[i] = steps[i].send(logits[offset:offset + len(rows)])
            except StopIteration as done:
                results[i] = done.value
            offset += len(rows)
    return [r for r in results if r is not None]


def _search(scores: np.ndarray, explained: Optional[int], to: Optional[int],
            prune: bool) -> Generator[np.ndarray, torch.Tensor, Search]:
    """One sample's search: yields candidate rows (removed [K, n] bool), receives their logits."""
    order = removal_order(scores)
    n = order.size
    if n == 0:
        raise InputError("nothing to remove: the input has no units")
    forwards = 0

    def flips(logits: torch.Tensor) -> np.ndarray:
        top = logits.argmax(-1).numpy()
        return top == to if to is not None else top != explained

    greedy, k, rounds = None, 0, 0
    original = final = torch.empty(0)
    while k <= n and greedy is None:                      # k = 0 too: already flipped needs no removal
        size = FIRST_CHUNK << (rounds // 2)               # 4, 4, 8, 8, 16, 16, ... prefixes a round
        ks = list(range(k, min(n, k + size - 1) + 1))
        rows = np.zeros((len(ks), n), dtype=bool)
        for row, count in enumerate(ks):
            rows[row, order[:count]] = True
        logits = yield rows
        forwards += len(ks)
        if k == 0:
            original = logits[0]
            if explained is None:
                explained = int(original.argmax())
        hit = np.flatnonzero(flips(logits))
        if hit.size:
            greedy = ks[int(hit[0])]
        final = logits[int(hit[0])] if hit.size else logits[-1]
        k, rounds = ks[-1] + 1, rounds + 1
    removed = [int(u) for u in order[:greedy]] if greedy is not None else []
    while prune and removed:                              # restore what the flip does not need
        base = np.zeros(n, dtype=bool)
        base[removed] = True
        singles = np.repeat(base[None], len(removed), axis=0)
        singles[np.arange(len(removed)), removed] = False
        logits = yield singles
        forwards += len(removed)
        spare = [u for u, ok in zip(removed, flips(logits)) if ok][::-1]     # least relevant first
        if not spare:
            break                                         # 1-minimal: no single unit can be restored
        cumulative = np.repeat(base[None], len(spare), axis=0)
        for row, unit in enumerate(spare):
            cumulative[row:, unit] = False
        logits = yield cumulative
        forwards += len(spare)
        still = flips(logits)
        kept = len(spare) if still.all() else int(np.argmin(still))        # up to the first failure
        if kept == 0:              # only if batched forwards disagree on a near-tie: keep the flip
            break
        final = logits[kept - 1]
        removed = [u for u in removed if u not in set(spare[:kept])]
    rank = {int(u): i for i, u in enumerate(order)}
    return Search(n_units=n, order=[int(u) for u in order], flipped=greedy is not None, greedy=greedy,
                  removed=sorted(removed, key=rank.__getitem__),
                  original_class=int(original.argmax()), original_probabilities=original.double().softmax(-1).tolist(),
                  new_class=int(final.argmax()), new_probabilities=final.double().softmax(-1).tolist(),
                  forwards=forwards)


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


def patch_forward(logits_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  replacement: torch.Tensor, grid: tuple[int, int]) -> ManyForward:
    """``ManyForward`` over the patches of a [B, 3, H, W] batch of images in [0, 1]: removed
    patches take ``replacement``'s pixels ([B, 3, H, W]). ``logits_of`` gets [K, 3, H, W] in [0, 1]."""
    from .eval.perturbation import expand_cells

    def forward(requests: Sequence[tuple[int, np.ndarray]]) -> torch.Tensor:
        owners = torch.tensor([i for i, _ in requests], device=images.device)
        cells = torch.from_numpy(np.stack([row for _, row in requests])).to(images.device)
        pixels = expand_cells(cells.reshape(len(requests), 1, *grid), tuple(images.shape[-2:]))
        with torch.no_grad():
            return logits_of(torch.where(pixels, replacement[owners], images[owners]))

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
    forward = patch_forward(lambda x: explainer.logits(normalization(x)), images, fill, grid)
    searches = search_removals([row.flatten().numpy() for row in scores], forward, result.target.tolist(), to,
                               batch_size, prune)
    return [ImageCounterfactual(search, grid, row.numpy()) for search, row in zip(searches, scores)]


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
            return (f"No counterfactual: even with all {s.n_units} words removed the model still says "
                    f"{self._label(s.new_class, s.new_probabilities)} (on the whole text: {before}).")
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


def word_forward(explainer: Any, tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[ManyForward, list[int]]:
    """``ManyForward`` over the words of ``texts`` (a removed word's tokens are deleted; special
    tokens stay) and each text's number of words (those within the model's length)."""
    special = set(tokenizer.all_special_ids)
    encoded = [tokenizer(text, truncation=True, max_length=max_length) for text in texts]
    tokens, counts = [], []
    for enc in encoded:
        ids, word_ids = enc["input_ids"], enc.word_ids()
        words = sorted({w for w, t in zip(word_ids, ids) if w is not None and t not in special})
        unit_of = {w: i for i, w in enumerate(words)}
        tokens.append([(t, unit_of[w] if w is not None and t not in special else -1) for t, w in zip(ids, word_ids)])
        counts.append(len(words))
    pad = tokenizer.pad_token_id or 0
    with_types = any("token_type_ids" in enc for enc in encoded)

    def forward(requests: Sequence[tuple[int, np.ndarray]]) -> torch.Tensor:
        kept = [[t for t, u in tokens[i] if u < 0 or not row[u]] for i, row in requests]
        width = max(len(k) for k in kept)
        batch = {"input_ids": torch.tensor([k + [pad] * (width - len(k)) for k in kept]),
                 "attention_mask": torch.tensor([[1] * len(k) + [0] * (width - len(k)) for k in kept])}
        if with_types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return explainer.logits(batch)

    return forward, counts


def text_counterfactuals(explainer: Any, tokenizer: Any, texts: Union[str, Sequence[str]],
                         method: str = "transformer_attribution", target: Any = None, to: Optional[int] = None,
                         batch_size: int = 64, prune: bool = True, **options: Any) -> list[TextCounterfactual]:
    """Counterfactuals of texts: per text, the words to delete, ranked by ``method``'s word
    relevance (the max over a word's sub-words) for ``target`` (default: the prediction)."""
    from .text.explain import _max_length, explain_text

    texts = [texts] if isinstance(texts, str) else list(texts)
    explanations = explain_text(explainer, tokenizer, texts, method, target=target, **options)
    forward, counts = word_forward(explainer, tokenizer, texts, _max_length(explainer.model, tokenizer))
    for exp, count in zip(explanations, counts):
        if count != len(exp.words):
            raise InputError(f"{count} words to remove but {len(exp.words)} explained in {exp.text[:40]!r}")
    searches = search_removals([np.array([w.relevance for w in exp.words]) for exp in explanations], forward,
                               [exp.target for exp in explanations], to, batch_size, prune)
    return [TextCounterfactual(exp, search, dict(explainer.labels)) for exp, search in zip(explanations, searches)]
