import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from relprop.eval.token_f1 import (
    DEFAULT_KS,
    encode_words,
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


def test_default_ks_are_the_papers():
    assert DEFAULT_KS == (10, 20, 30, 40, 50, 60, 70, 80)


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
