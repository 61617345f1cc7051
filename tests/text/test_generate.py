"""Explaining generated text (`relprop.text.explain_generation`): greedy generation equals the
model's own argmax, each row of the matrix equals that token explained alone, and the views and
the CLI (`relprop explain-text --model DIR --generate N`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

import relprop
from relprop.errors import InputError, UnsupportedModelError
from relprop.text import explain_generation
from tests.conftest import assert_cli_error, run_relprop

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "the", "movie", "was", "good", "bad", "and", "i", "liked", "it", "10",
         "/", ",", ".", ":", "a", "plot", "<b>&amp;", "actor", "film", "great", "boring", "story", "very", "not",
         "really", "fun", "dull", "long", "short", "music", "end", "scene"]


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer built offline ("<b>&amp;" is a word: the HTML must escape it)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")


def _gpt2():
    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=len(WORDS), n_positions=32,
                           pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return tf.GPT2LMHeadModel(config).eval()


def _llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=len(WORDS), max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return tf.LlamaForCausalLM(config).eval()


PROMPT = "the movie was <b>&amp; and i"


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_rows_are_the_greedy_tokens_explained_alone(build):
    """Generated ids = greedy argmax of the model's own logits; row t (batched, right-padded) =
    explain(prompt + generated[:t], target=generated[t]) alone in float64; NaN past the context."""
    model, tokenizer = build(), _tokenizer()
    explainer = relprop.Explainer(model, dtype=torch.float64)
    result = explain_generation(explainer, tokenizer, PROMPT, max_new_tokens=5, batch_size=3)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert result.prompt_ids == prompt_ids and result.method == "attnlrp"
    sequence = list(prompt_ids)
    with torch.no_grad():
        for _ in range(len(result.generated_ids)):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert result.generated_ids == sequence[len(prompt_ids):]
    assert len(result.generated_ids) == 5 or result.stopped_at_eos
    P, N = len(prompt_ids), len(result.generated_ids)
    assert result.matrix.shape == (N, P + N - 1) and result.matrix.dtype == np.float64
    for t in range(N):
        alone = explainer.explain({"input_ids": torch.tensor([sequence[:P + t]])}, "attnlrp",
                                  target=sequence[P + t]).relevance[0].double().numpy()
        np.testing.assert_allclose(result.matrix[t, :P + t], alone, rtol=0, atol=1e-6 * max(1.0, np.abs(alone).max()))
        assert np.isnan(result.matrix[t, P + t:]).all()
    assert np.isfinite(result.matrix[np.tril_indices(N, P - 1)]).all()


def test_stops_at_eos_and_other_methods():
    """Generation stops at an end-of-sequence token (generated and explained); any method runs."""
    model, tokenizer = _gpt2(), _tokenizer()
    explainer = relprop.Explainer(model)
    first = explain_generation(explainer, tokenizer, PROMPT, max_new_tokens=1).generated_ids[0]
    model.config.eos_token_id = first                   # the first greedy token now ends the text
    result = explain_generation(explainer, tokenizer, PROMPT, max_new_tokens=6, method="transformer_attribution")
    assert result.generated_ids == [first] and result.stopped_at_eos
    assert result.matrix.shape == (1, len(result.prompt_ids)) and np.isfinite(result.matrix).all()


def test_views_escape_and_show_every_token():
    """HTML: every token a header, escaped; one grey cell per NaN; JSON: ids, null past the context;
    terminal: a line per generated token."""
    model, tokenizer = _gpt2(), _tokenizer()
    result = explain_generation(relprop.Explainer(model), tokenizer, PROMPT, max_new_tokens=4)
    page = result.to_html()
    assert "<b>&amp;" not in page and "&lt;b&gt;&amp;amp;" in page
    for token in result.prompt_tokens + result.generated_tokens:
        assert f">{token.replace('<b>&amp;', '&lt;b&gt;&amp;amp;')}</th>" in page
    assert page.count("<tr>") == len(result.generated_ids) + 1
    assert page.count('class="out"') == np.isnan(result.matrix).sum()
    data = json.loads(json.dumps(result.to_json()))
    assert [g["id"] for g in data["generated_tokens"]] == result.generated_ids
    assert data["matrix"][0][-1] is None or len(result.generated_ids) == 1
    ansi = result.to_ansi(top_k=2)
    assert len(ansi.splitlines()) == len(result.generated_ids) + 1
    for token in result.generated_tokens:
        assert repr(token) in ansi


def test_refuses_bad_input():
    """max_new_tokens < 1, an empty prompt, too long for the positions, a classifier: clear errors."""
    model, tokenizer = _gpt2(), _tokenizer()
    explainer = relprop.Explainer(model)
    with pytest.raises(InputError, match="max_new_tokens"):
        explain_generation(explainer, tokenizer, PROMPT, max_new_tokens=0)
    with pytest.raises(InputError, match="prompt is empty"):
        explain_generation(explainer, tokenizer, "   ", max_new_tokens=2)
    with pytest.raises(InputError, match="32 positions"):
        explain_generation(explainer, tokenizer, PROMPT, max_new_tokens=40)
    classifier = tf.GPT2ForSequenceClassification(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4,
                                                                vocab_size=len(WORDS), pad_token_id=0)).eval()
    with pytest.raises(UnsupportedModelError, match="causal language model"):
        explain_generation(relprop.Explainer(classifier), tokenizer, PROMPT)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_lm")
    _gpt2().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def test_cli_generate_writes_html_and_json(lm_folder, tmp_path):
    """The real command writes generation.html/json holding the greedy tokens explained with attnlrp."""
    out = tmp_path / "out"
    result = run_relprop("explain-text", PROMPT, "--model", str(lm_folder), "--generate", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads((out / "generation.json").read_text())
    expected = explain_generation(relprop.Explainer(_gpt2()), _tokenizer(), PROMPT, max_new_tokens=3)
    assert [g["id"] for g in data["generated_tokens"]] == expected.generated_ids
    assert data["method"] == "attnlrp"
    assert "&lt;b&gt;" in (out / "generation.html").read_text()
    assert str(out / "generation.html") in result.stdout


def test_cli_generate_errors(lm_folder, bert_folder):
    """--generate N < 1, a classifier folder, the bundled classifier, --target: one line, exit 2."""
    assert_cli_error(run_relprop("explain-text", "hi", "--model", str(lm_folder), "--generate", "0"), 2,
                     "--generate", "positive integer")
    assert_cli_error(run_relprop("explain-text", "the movie", "--model", str(bert_folder), "--generate", "2"), 2,
                     "not a causal language model", "--generate")
    assert_cli_error(run_relprop("explain-text", "the movie", "--generate", "2"), 2, "--model", "causal language model")
    assert_cli_error(run_relprop("explain-text", "the", "--model", str(lm_folder), "--generate", "2",
                                 "--target", "1"), 2, "--target", "--generate")
    # without --generate, a causal LM is not loaded as a classifier with a new, random head
    assert_cli_error(run_relprop("explain-text", "the movie", "--model", str(lm_folder)), 2,
                     "GPT2LMHeadModel", "causal language model", "--generate N")
