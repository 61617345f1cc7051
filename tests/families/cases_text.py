"""Contract cases of the text families beyond BERT / RoBERTa / DistilBERT (registered into `cases.CASES`)."""
from __future__ import annotations

import transformers as tf

from tests.families.cases import TEXT_CONFIG, Case, hf_builder, register, text_inputs

register(Case("electra", "text",
              hf_builder(tf.ElectraConfig, tf.ElectraForSequenceClassification, embedding_size=16, **TEXT_CONFIG),
              text_inputs(first=2)))
register(Case("albert", "text",
              hf_builder(tf.AlbertConfig, tf.AlbertForSequenceClassification, embedding_size=16, **TEXT_CONFIG),
              text_inputs(first=2)))
_MODERNBERT = dict(TEXT_CONFIG, num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=4,
                   pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
for _pooling in ("cls", "mean"):
    register(Case(f"modernbert_{_pooling}", "text",
                  hf_builder(tf.ModernBertConfig, tf.ModernBertForSequenceClassification, classifier_pooling=_pooling,
                             **_MODERNBERT),
                  text_inputs(first=2)))
register(Case("deberta_v2", "text",
              hf_builder(tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification, relative_attention=True,
                         pos_att_type=["c2p", "p2c"], position_buckets=8, max_relative_positions=16,
                         pooler_hidden_size=32, **TEXT_CONFIG),
              text_inputs(first=1), sdpa=False))
