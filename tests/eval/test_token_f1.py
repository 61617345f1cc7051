import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from relprop.eval.token_f1 import (
    DEFAULT_KS,
    encode_words,
    rationale_masks,
    token_f1_table,
    top_k_mask,
    word_relevance,
)

nan = np.nan


def _close(table_row: dict, precision: float, recall: float, f1: float) -> None:
    assert table_row == pytest.approx({"precision": precision, "recall": recall, "f1": f1})


# Two documents; hand computation of the per-document and macro scores:
# doc1 relevance [.9 .1 .8 .3 .2], gold {0, 2, 3}
#   k=2: top {0, 2}    -> 2 hits: P = 2/2 = 1,  R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8
#   k=3: top {0, 2, 3} -> 3 hits: P = 1,        R = 1,   F1 = 1
# doc2 relevance [.5 .7 .6 .1], gold {1, 3}
#   k=2: top {1, 2}    -> 1 hit:  P = 1/2,      R = 1/2, F1 = 1/2
#   k=3: top {1, 2, 0} -> 1 hit:  P = 1/3,      R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4
# macro k=2: P = (1 + 1/2)/2 = 0.75, R = (2/3 + 1/2)/2 = 7/12, F1 = (0.8 + 0.5)/2 = 0.65
#   (the F1 of the averaged P and R would be 0.65625: ERASER averages per-document F1s)
# macro k=3: P = (1 + 1/3)/2 = 2/3,  R = (1 + 1/2)/2 = 0.75, F1 = (1 + 0.4)/2 = 0.7
# micro k=2: 3 hits / 4 predicted = 0.75, 3 hits / 5 gold = 0.6, F1 = 2*.45/1.35 = 2/3
RELEVANCES = [np.array([0.9, 0.1, 0.8, 0.3, 0.2]), np.array([0.5, 0.7, 0.6, 0.1])]
GOLD = [np.array([1, 0, 1, 1, 0], bool), np.array([0, 1, 0, 1], bool)]


def test_macro_table_matches_hand_computation():
    table = token_f1_table(RELEVANCES, GOLD, ks=[2, 3])
    assert list(table) == [2, 3]
    _close(table[2], 0.75, 7 / 12, 0.65)
    _close(table[3], 2 / 3, 0.75, 0.7)


def test_micro_pools_counts():
    _close(token_f1_table(RELEVANCES, GOLD, ks=[2], average="micro")[2], 0.75, 0.6, 2 / 3)


def test_default_ks_are_the_authors():
    # bert_pipeline.py: range(5, 85, 5)
    assert DEFAULT_KS == (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80)


def test_negative_relevance_is_clipped_before_ranking_by_default():
    # relevance [-.3 -.1 .5 .2], gold {1}.
    # clipped [0 0 .5 .2]: top-3 = {2, 3} + the first zero word {0} -> 0 hits: P = R = F1 = 0
    # raw scores: top-3 = {2, 3, 1} -> 1 hit: P = 1/3, R = 1/1, F1 = 2*(1/3)/(4/3) = 0.5
    relevance, gold = [np.array([-0.3, -0.1, 0.5, 0.2])], [np.array([0, 1, 0, 0], bool)]
    _close(token_f1_table(relevance, gold, ks=[3])[3], 0.0, 0.0, 0.0)
    _close(token_f1_table(relevance, gold, ks=[3], clip_negative=False)[3], 1 / 3, 1.0, 0.5)


def test_clipped_ties_go_to_the_earliest_words_for_every_k():
    # [-1 .4 -2 -.5 nan] clips to [0 .4 0 0 nan]; the zeros rank in document order 0, 2, 3
    masks = rationale_masks(np.array([-1.0, 0.4, -2.0, -0.5, nan]), ks=[1, 2, 3, 4, 5])
    assert {k: np.flatnonzero(m).tolist() for k, m in masks.items()} == {
        1: [1], 2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3], 5: [0, 1, 2, 3]}
    # unclipped, the least negative word comes second instead
    raw = rationale_masks(np.array([-1.0, 0.4, -2.0, -0.5, nan]), ks=[2], clip_negative=False)
    assert np.flatnonzero(raw[2]).tolist() == [1, 3]


def test_clipping_words_equals_clipping_word_pieces_before_max():
    # the authors clamp word pieces, then take the max per word; max and clamp at 0 commute
    rng = np.random.default_rng(0)
    pieces = rng.normal(size=300)
    word_ids = np.sort(rng.integers(0, 120, size=300))
    word_ids[:2] = -1  # special tokens
    clipped_pieces = word_relevance(np.maximum(pieces, 0), word_ids, n_words=120)
    raw = word_relevance(pieces, word_ids, n_words=120)
    np.testing.assert_array_equal(clipped_pieces, np.maximum(raw, 0))
    for k, mask in rationale_masks(raw).items():
        np.testing.assert_array_equal(mask, rationale_masks(clipped_pieces, clip_negative=False)[k])


def test_carry_over_changes_nothing_under_the_first_word_tie_rule():
    # the stable order makes top-j a subset of top-k, so even heavily tied scores agree
    rng = np.random.default_rng(1)
    for _ in range(5):
        relevance = rng.integers(-3, 3, size=150).astype(float)
        plain, carried = rationale_masks(relevance), rationale_masks(relevance, carry_over=True)
        for k in DEFAULT_KS:
            np.testing.assert_array_equal(plain[k], carried[k])
            assert plain[k].sum() == k


def test_tie_rule_is_checked_and_torch_rule_handles_short_documents():
    np.testing.assert_array_equal(top_k_mask(np.array([0.2, nan, 0.1]), 10, ties="torch"), [1, 0, 1])
    with pytest.raises(ValueError, match="ties"):
        top_k_mask(np.array([0.2]), 1, ties="random")


def test_k_larger_than_document_selects_every_word():
    # 3 words, gold {0}, k=10 -> all 3 predicted: P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 0.5
    table = token_f1_table([np.array([0.2, 0.5, 0.1])], [np.array([1, 0, 0], bool)], ks=[10])
    _close(table[10], 1 / 3, 1.0, 0.5)


def test_document_without_gold_rationale_counts_as_zero():
    # doc A: top-1 {0} = gold -> 1, 1, 1. doc B: no gold, 1 predicted -> P = 0/1, R = 0, F1 = 0
    # (as in ERASER, where every document with a prediction is an instance). Macro = 0.5 each.
    table = token_f1_table([np.array([0.9, 0.1]), np.array([0.3, 0.2, 0.1])],
                           [np.array([1, 0], bool), np.zeros(3, bool)], ks=[1])
    _close(table[1], 0.5, 0.5, 0.5)


def test_empty_document_is_not_an_instance():
    # an empty document has neither gold nor predicted tokens, so only doc A counts
    table = token_f1_table([np.array([0.9, 0.1]), np.array([])], [np.array([1, 0], bool), np.zeros(0, bool)], ks=[1])
    _close(table[1], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no document"):
        token_f1_table([np.array([])], [np.zeros(0, bool)], ks=[1])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="relevance shape"):
        token_f1_table([np.array([0.1, 0.2])], [np.zeros(3, bool)], ks=[1])


def test_top_k_ties_go_to_earlier_words_and_nan_is_never_chosen():
    np.testing.assert_array_equal(top_k_mask(np.array([1.0, 1.0, 1.0, 0.0]), 2), [1, 1, 0, 0])
    np.testing.assert_array_equal(top_k_mask(np.array([nan, 0.5, nan, 0.1]), 3), [0, 1, 0, 1])
    # words cut off by truncation (NaN) still count as gold: gold {1, 2}, k=3 picks {1, 3}
    # -> P = 1/2, R = 1/2, F1 = 1/2
    table = token_f1_table([np.array([nan, 0.5, nan, 0.1])], [np.array([0, 1, 1, 0], bool)], ks=[3])
    _close(table[3], 0.5, 0.5, 0.5)


# sub-words: [CLS] w0 w0 w1 w2 [SEP] with scores 5 .2 .7 .1 .4 9 (specials ignored)
SUBWORD_SCORES = np.array([5.0, 0.2, 0.7, 0.1, 0.4, 9.0])


@pytest.mark.parametrize("word_ids", [[None, 0, 0, 1, 2, None], [-1, 0, 0, 1, 2, -1]])
def test_word_relevance_max_and_sum(word_ids):
    np.testing.assert_allclose(word_relevance(SUBWORD_SCORES, word_ids), [0.7, 0.1, 0.4])
    np.testing.assert_allclose(word_relevance(SUBWORD_SCORES, word_ids, reduce="sum"), [0.9, 0.1, 0.4])


def test_word_relevance_negative_scores_and_missing_words():
    # max of (-.5, -.2) is -.2, not 0; word 3 has no sub-word (e.g. truncated) -> NaN
    out = word_relevance(np.array([-0.5, -0.2, 0.3]), [0, 0, 1], n_words=3)
    np.testing.assert_allclose(out, [-0.2, 0.3, nan])
    with pytest.raises(ValueError, match="reduce"):
        word_relevance(np.array([1.0]), [0], reduce="mean")


@pytest.fixture
def tokenizer():
    # a tiny uncased WordPiece tokenizer built like BERT's (same API in transformers 4 and 5)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "i", "loved", "schwarz", "##ene", "##gger", "'", "s", "movie"]
    ids = {w: i for i, w in enumerate(vocab)}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def test_encode_words_links_subwords_to_words(tokenizer):
    words = ["I", "loved", "Schwarzenegger's", "movie"]
    enc = encode_words(tokenizer, words)
    doc = " ".join(words)
    assert tokenizer.convert_ids_to_tokens(enc.input_ids) == [
        "[CLS]", "i", "loved", "schwarz", "##ene", "##gger", "'", "s", "movie", "[SEP]"]
    np.testing.assert_array_equal(enc.word_ids, [-1, 0, 1, 2, 2, 2, 2, 2, 3, -1])
    assert [doc[a:b] for a, b in enc.char_offsets] == [
        "", "I", "loved", "Schwarz", "ene", "gger", "'", "s", "movie", ""]
    # max over "schwarz ##ene ##gger ' s" = 5
    scores = np.array([0, 1, 2, 3, 4, 5, 1, 2, 6, 0], dtype=float)
    np.testing.assert_allclose(word_relevance(scores, enc.word_ids, n_words=4), [1, 2, 5, 6])


def test_encode_words_truncation_leaves_trailing_words_unscored(tokenizer):
    enc = encode_words(tokenizer, ["I", "loved", "Schwarzenegger's", "movie"], max_length=5)
    np.testing.assert_array_equal(enc.word_ids, [-1, 0, 1, 2, -1])
    out = word_relevance(np.ones(5), enc.word_ids, n_words=4)
    np.testing.assert_array_equal(np.isnan(out), [False, False, False, True])


SPECIALS = ("[CLS]", "[SEP]", "[UNK]", "[PAD]")


def authors_selection(pieces: list[str], piece_scores: np.ndarray, words: list[str], ks) -> dict[int, set[int]]:
    """The authors' selection, transcribed from bert_pipeline.py (Transformer-Explainability).

    Lines 552-563: clamp the word-piece scores at 0; give every character of a piece the
    piece's score (specials skipped, "##" dropped) and every whitespace word the max over its
    characters. Lines 566-582: for each k, append ``cam.topk(k)`` to one list per document;
    ERASER's scorer reads the list as a set of token positions.
    """
    cam = torch.tensor(piece_scores, dtype=torch.float32).clamp(min=0)
    char_scores = []
    for piece, score in zip(pieces, cam):
        if piece in SPECIALS:
            continue
        char_scores += [score] * len(piece.replace("##", ""))
    word_scores, start = [], 0
    for word in words:
        if start >= len(char_scores):
            break
        word_scores.append(np.max(char_scores[start:start + len(word)]))
        start += len(word)
    cam = torch.tensor(word_scores)
    chosen, predictions = [], {}
    for k in ks:
        chosen += cam.topk(k=k).indices.tolist()
        predictions[k] = set(chosen)
    return predictions


def eraser_token_macro(gold: list[set[int]], predicted: list[set[int]]) -> dict[str, float]:
    """ERASER's instance-macro token P/R/F1 (metrics.py, score_hard_rationale_predictions)."""
    scores = []
    for g, p in zip(gold, predicted):
        if not g and not p:
            continue
        precision = len(g & p) / len(p) if p else 0
        recall = len(g & p) / len(g) if g else 0
        scores.append((precision, recall, 0 if precision == 0 or recall == 0
                       else 2 * precision * recall / (precision + recall)))
    return dict(zip(("precision", "recall", "f1"), np.mean(scores, axis=0)))


def _review(tokenizer, seed: int, n_positive: int | None, n_words: int = 120):
    """A review of the fixture's words with random word-piece scores, cut at 512 pieces; with
    ``n_positive``, only that many (scored) words keep a positive score, the others are negative."""
    rng = np.random.default_rng(seed)
    words = list(rng.choice(["I", "loved", "Schwarzenegger's", "movie"], p=[0.3, 0.3, 0.1, 0.3], size=n_words))
    enc = encode_words(tokenizer, words)
    scores = rng.uniform(0.01, 1.0, size=len(enc.input_ids))
    if n_positive is not None:
        positive = rng.choice(np.unique(enc.word_ids[enc.word_ids >= 0]), size=n_positive, replace=False)
        scores[~np.isin(enc.word_ids, positive)] *= -1
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
    relevance = word_relevance(scores.astype(np.float32), enc.word_ids, n_words=len(words))
    return authors_selection(pieces, scores, words, DEFAULT_KS), relevance


def _positions(masks: dict[int, np.ndarray]) -> dict[int, set[int]]:
    return {k: set(np.flatnonzero(m).tolist()) for k, m in masks.items()}


def test_default_agrees_with_the_authors_selection_on_positive_untied_scores(tokenizer):
    authors, relevance = _review(tokenizer, seed=0, n_positive=None)
    assert authors[80] and all(len(authors[k]) == k for k in DEFAULT_KS)
    assert _positions(rationale_masks(relevance)) == authors
    for options in [dict(clip_negative=False), dict(carry_over=True), dict(ties="torch", carry_over=True)]:
        assert _positions(rationale_masks(relevance, **options)) == authors, options


@pytest.mark.parametrize("n_positive", [3, 30])
def test_carry_over_with_torch_ties_reproduces_the_authors_selection(tokenizer, n_positive):
    # 400 words, cut at 512 pieces (about 360 scored words); only n_positive words score > 0,
    # so for larger k the top k is filled with clipped zeros
    authors, relevance = _review(tokenizer, seed=1, n_positive=n_positive, n_words=400)
    assert np.isnan(relevance[-1]) and int(np.sum(relevance > 0)) == n_positive
    assert _positions(rationale_masks(relevance, carry_over=True, ties="torch")) == authors
    default = _positions(rationale_masks(relevance))
    # while the k words are all positive (and untied), the default agrees with the authors
    assert all(default[k] == authors[k] for k in DEFAULT_KS if k <= n_positive)
    assert all(len(default[k]) == k for k in DEFAULT_KS)


def test_authors_carry_over_outgrows_k_when_torch_ties_are_not_nested(tokenizer):
    # With fewer than 10 positive words, torch.topk (CPU) picks different zero-scored words for
    # k = 5 (a partial sort, as k * 64 <= n) than for k = 10, so the authors' prediction at
    # k >= 10 carries extra words. Tied to torch's implementation: if it fails, re-check the quirk.
    authors, relevance = _review(tokenizer, seed=1, n_positive=3, n_words=400)
    assert int(np.sum(~np.isnan(relevance))) >= 320
    assert len(authors[5]) == 5 and len(authors[10]) > 10
    plain = _positions(rationale_masks(relevance, ties="torch"))
    assert len(plain[10]) == 10 and plain[10] != authors[10]


def test_table_equals_eraser_scoring_of_the_authors_rationales(tokenizer):
    reviews = [_review(tokenizer, seed, n_positive) for seed, n_positive in [(2, None), (3, 15), (4, 40)]]
    rng = np.random.default_rng(5)
    golds = [rng.random(120) < 0.3 for _ in reviews]
    table = token_f1_table([r for _, r in reviews], golds, carry_over=True, ties="torch")
    gold_sets = [set(np.flatnonzero(g).tolist()) for g in golds]
    for k in DEFAULT_KS:
        expected = eraser_token_macro(gold_sets, [authors[k] for authors, _ in reviews])
        assert table[k] == pytest.approx(expected), k
