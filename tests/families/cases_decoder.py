"""Contract cases of the decoder language models: causal LMs and their sequence-classification
heads (registered into `cases.CASES`). Tiny configs with grouped-query attention (4 query, 2
key-value heads); every batch is also checked left-padded."""
from __future__ import annotations

import torch
import transformers as tf

from tests.families.cases import Case, hf_builder, register, text_inputs

VOCAB = 100
DECODER_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                      pad_token_id=0)
# Gemma: small head_dim and a sliding window shorter than the inputs (local layers mask for real)
GEMMA_CONFIG = dict(DECODER_CONFIG, head_dim=8, sliding_window=4)

# (name, config class, causal LM class, classifier class or None, extra config, SDPA implementation)
DECODERS = [
    ("llama", tf.LlamaConfig, tf.LlamaForCausalLM, tf.LlamaForSequenceClassification, {}, True),
    ("qwen2", tf.Qwen2Config, tf.Qwen2ForCausalLM, tf.Qwen2ForSequenceClassification, {}, True),
    ("mistral", tf.MistralConfig, tf.MistralForCausalLM, tf.MistralForSequenceClassification,
     {"sliding_window": 5}, True),
    # Gemma2: soft-capped attention scores and logits; eager attention only (SDPA has no soft-capping)
    ("gemma2", tf.Gemma2Config, tf.Gemma2ForCausalLM, tf.Gemma2ForSequenceClassification, GEMMA_CONFIG, False),
    ("gemma3", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, tf.Gemma3TextForSequenceClassification,
     dict(GEMMA_CONFIG, layer_types=["sliding_attention", "full_attention"]), True),
    ("gemma4", tf.Gemma4TextConfig, tf.Gemma4ForCausalLM, None,
     dict(GEMMA_CONFIG, global_head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
          layer_types=["sliding_attention", "full_attention"]), True),
]


def _config(extra: dict) -> dict:
    return {**DECODER_CONFIG, **extra}


# GPT-2: learned absolute positions, fused q/k/v (Conv1D as addmm), tanh GELU written out in
# element-wise ops (one activation step of the graph)
GPT2_CONFIG = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64, num_labels=3,
                   pad_token_id=0, bos_token_id=1, eos_token_id=1)
# SDPA and eager copies compared in float64: on SDPA models the paper's method runs the fused
# kernel (its forward keeps no attention matrix, `explainer`), whose float32 rounding differs from
# the eager softmax's, and LRP amplifies float32 rounding (README, Correctness)
SDPA_EAGER = torch.float64
register(Case("gpt2_lm", "text", hf_builder(tf.GPT2Config, tf.GPT2LMHeadModel, **GPT2_CONFIG), text_inputs(first=2),
              left_inputs=text_inputs(first=2, side="left"), classes=VOCAB, scores_at_last=True,
              sdpa_eager_dtype=SDPA_EAGER))
register(Case("gpt2_classifier", "text", hf_builder(tf.GPT2Config, tf.GPT2ForSequenceClassification, **GPT2_CONFIG),
              text_inputs(first=2), left_inputs=text_inputs(first=2, side="left"), sdpa_eager_dtype=SDPA_EAGER))

for _name, _config_cls, _lm, _classifier, _extra, _sdpa in DECODERS:
    register(Case(f"{_name}_lm", "text", hf_builder(_config_cls, _lm, **_config(_extra)), text_inputs(first=2),
                  left_inputs=text_inputs(first=2, side="left"), classes=VOCAB, scores_at_last=True, sdpa=_sdpa,
                  sdpa_eager_dtype=SDPA_EAGER))
    if _classifier is not None:
        register(Case(f"{_name}_classifier", "text", hf_builder(_config_cls, _classifier, **_config(_extra)),
                      text_inputs(first=2), left_inputs=text_inputs(first=2, side="left"), sdpa=_sdpa,
                      sdpa_eager_dtype=SDPA_EAGER))
