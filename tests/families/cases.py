"""The family contract kit's registry: one `Case` per supported model family (tiny random
configs, no downloads). `test_contract.py` runs every contract check on every registered case;
a new family registers a case here (or in a `cases_*.py` module imported at the bottom)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import transformers as tf


@dataclass
class Case:
    """How to build one family's model and inputs for the contract tests.

    ``build(attn_implementation)`` returns a model with random weights as built from its config
    (training mode; ``attn_implementation`` None = the library default). ``inputs(batch)``
    returns the forward arguments of a batch (text: mixed lengths, right padding, sample 1 the
    shortest). ``target`` is a callable target for models without class scores (headless
    backbones); None = class indices. ``attentions``: the eager model returns its attention
    probabilities (``output_attentions=True``) in the order relprop explains them
    (``attentions_of(output)`` reads them). ``shared``: inputs that are not per sample (CLIP's
    text prompts): every sample alone gets them whole, and they are no padding mask.
    ``sdpa_eager_dtype``: the dtype the SDPA and eager copies are compared in (float64 where
    the two graphs round differently in float32, which LRP amplifies). ``sdpa``: the
    library has an SDPA implementation of the model (DeBERTa-v2 has eager attention only).
    ``left_inputs``: the same kind of batch left-padded (decoders), also checked for batch =
    single; None: right padding only. ``scores_at_last``: ``logits(output)`` is [B, N, V] (a
    causal LM's next-token logits) and the explained scores are those at each sample's last
    real token.
    """

    name: str
    modality: str
    build: Callable[[Optional[str]], torch.nn.Module]
    inputs: Callable[[int], dict[str, Any]]
    target: Optional[Callable[[Any], torch.Tensor]] = None
    attentions: bool = True
    sdpa: bool = True
    classes: int = 3
    forward: Callable[[torch.nn.Module, dict], Any] = lambda model, inputs: model(**inputs)
    logits: Callable[[Any], torch.Tensor] = lambda output: output.logits
    attentions_of: Callable[[Any], tuple] = lambda output: output.attentions
    shared: tuple[str, ...] = ()
    sdpa_eager_dtype: torch.dtype = torch.float32
    left_inputs: Optional[Callable[[int], dict[str, Any]]] = None
    scores_at_last: bool = False

    def per_sample(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k not in self.shared}


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    CASES[case.name] = case
    return case


def strong_init(model: torch.nn.Module) -> torch.nn.Module:
    """Stronger-than-default random weights, so attention is far from uniform."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model


def hf_builder(config_cls, model_cls, **config) -> Callable[[Optional[str]], torch.nn.Module]:
    def build(attn_implementation=None):
        torch.manual_seed(0)
        cfg = config_cls(**config)
        if attn_implementation:
            cfg._attn_implementation = attn_implementation
        return strong_init(model_cls(cfg))
    return build


def image_inputs(size: int = 32, channels: int = 3) -> Callable[[int], dict]:
    def inputs(batch=3):
        gen = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}
    return inputs


def text_inputs(first: int = 2, pad: int = 0, length: int = 12, vocab: int = 100,
                token_types: bool = False, side: str = "right", positions: bool = False) -> Callable[[int], dict]:
    """Ids with the model's first token, sample 1 padded to 7 real tokens (mixed lengths), on the
    right or (``side="left"``, decoders) on the left. ``positions``: also ``position_ids``
    counting the real tokens from 0 (as generate() passes them with left padding)."""
    def inputs(batch=3):
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(5, vocab, (batch, length), generator=gen)
        ids[:, 0] = first
        mask = torch.ones_like(ids)
        if batch > 1:
            padded = slice(7, None) if side == "right" else slice(None, length - 7)
            mask[1, padded] = 0
            ids[1, padded] = pad
            if side == "left":
                ids[1, length - 7] = first
        out = {"input_ids": ids, "attention_mask": mask}
        if token_types:
            out["token_type_ids"] = torch.zeros_like(ids)
        if positions:
            out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        return out
    return inputs


VISION_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8, num_labels=5)
TEXT_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=100, num_labels=3, max_position_embeddings=40)

register(Case("vit", "image", hf_builder(tf.ViTConfig, tf.ViTForImageClassification, **VISION_CONFIG),
              image_inputs(), classes=5))
register(Case("deit", "image", hf_builder(tf.DeiTConfig, tf.DeiTForImageClassification, **VISION_CONFIG),
              image_inputs(), classes=5))
register(Case("deit_teacher", "image",
              hf_builder(tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher, **VISION_CONFIG),
              image_inputs(), classes=5))
register(Case("bert", "text", hf_builder(tf.BertConfig, tf.BertForSequenceClassification, **TEXT_CONFIG),
              text_inputs(first=2)))
register(Case("roberta", "text", hf_builder(tf.RobertaConfig, tf.RobertaForSequenceClassification, **TEXT_CONFIG),
              text_inputs(first=0, pad=1)))
register(Case("xlm_roberta", "text",
              hf_builder(tf.XLMRobertaConfig, tf.XLMRobertaForSequenceClassification, **TEXT_CONFIG),
              text_inputs(first=0, pad=1)))
register(Case("distilbert", "text",
              hf_builder(tf.DistilBertConfig, tf.DistilBertForSequenceClassification, dim=32, n_layers=2, n_heads=4,
                         hidden_dim=64, vocab_size=100, num_labels=3, max_position_embeddings=40),
              text_inputs(first=2)))


def _timm_build(distilled=False, **options):
    def build(attn_implementation=None):
        from tests.timm_style import VisionTransformer, VisionTransformerDistilled
        torch.manual_seed(0)
        cls = VisionTransformerDistilled if distilled else VisionTransformer
        return randomize_timm(cls(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4,
                                  **options))
    return build


def randomize_timm(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
            elif p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def _timm_forward(model, inputs):
    return model(inputs["pixel_values"])


for _name, _options in (("timm_vit", {}), ("timm_deit_distilled", {"distilled": True})):
    register(Case(_name, "image", _timm_build(**_options), image_inputs(), attentions=False, classes=5,
                  forward=_timm_forward, logits=lambda output: output))

# further families register their cases in these modules
from tests.families import cases_decoder, cases_swin, cases_text, cases_vision  # noqa: E402,F401
