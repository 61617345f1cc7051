"""The bundled tiny causal language model (src/relprop/assets/tiny_lm): loads offline, generates
the greedy text its training log recorded, and is explained by relprop."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

import relprop
from relprop.text import explain_generation
from relprop.text.pretrained import (TINY_LM_DIR, TINY_LM_SAMPLE_PROMPTS, TINY_LM_SAMPLE_TOKENS,
                                     greedy_continuation, load_tiny_lm)
from tests.conftest import assert_cli_error, run_relprop

LOG = json.loads((TINY_LM_DIR / "training_log.json").read_text())


@pytest.fixture(scope="module")
def tiny_lm():
    return load_tiny_lm()


def test_loads_offline_as_a_small_float32_llama_in_eval_mode(tiny_lm):
    model, tokenizer = tiny_lm
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == LOG["num_parameters"]
    assert len(tokenizer) == model.config.vocab_size == LOG["vocab_size"]
    ids = tokenizer("the movie is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id is not None
    # small in the repository: float16 storage, a few MB in all
    with safe_open(TINY_LM_DIR / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
    assert sum(f.stat().st_size for f in TINY_LM_DIR.iterdir()) < 4_000_000


def test_held_out_perplexity_is_recorded():
    for name in ("sst2_test", "reviews_cv900_999"):
        value = LOG["held_out_perplexity"][name]
        assert math.isfinite(value) and 1 < value < LOG["vocab_size"]


def test_greedy_text_is_deterministic_and_the_recorded_one(tiny_lm):
    model, tokenizer = tiny_lm
    for prompt in TINY_LM_SAMPLE_PROMPTS:
        text = greedy_continuation(model, tokenizer, prompt)
        assert text == LOG["greedy_samples"][prompt]
        assert text == greedy_continuation(model, tokenizer, prompt)


def test_explain_generation_explains_the_recorded_continuation(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = TINY_LM_SAMPLE_PROMPTS[0]
    result = explain_generation(relprop.Explainer(model), tokenizer, prompt, max_new_tokens=TINY_LM_SAMPLE_TOKENS)
    assert result.generated_text == LOG["greedy_samples"][prompt]
    in_context = ~np.isnan(result.matrix)
    assert np.all(np.isfinite(result.matrix[in_context])) and np.abs(result.matrix[in_context]).max() > 0


def test_cli_generates_with_the_bundled_lm_and_refuses_it_as_a_classifier(tmp_path):
    result = run_relprop("explain-text", "the movie is", "--model", "tiny-lm", "--generate", "4",
                         "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert len(record["generated_tokens"]) == 4 and record["method"] == "attnlrp"
    assert_cli_error(run_relprop("explain-text", "the movie is", "--model", "tiny-lm"), 2,
                     "causal language model", "--generate N")
