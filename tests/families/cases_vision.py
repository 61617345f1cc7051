"""Contract cases of the vision families beyond ViT / DeiT / timm ViT (registered into `cases.CASES`)."""
from __future__ import annotations

import torch
import transformers as tf

from tests.families.cases import (VISION_CONFIG, Case, _timm_build, _timm_forward, hf_builder, image_inputs,
                                  register)


def similarity_target(field: str, dim: int):
    """A callable target for a headless model: the dot product of an output embedding with a
    fixed reference embedding (one score per sample)."""
    reference = torch.randn(dim, generator=torch.Generator().manual_seed(2))

    def target(output):
        embedding = getattr(output, field)
        return embedding @ reference.to(embedding)
    return target


# BEiT: relative position bias per layer or shared; head on the mean of the patch tokens or on [CLS].
# Its exported SDPA mask is the bias plus 1 (an all-True bool mask added): softmax-invariant, but
# float32 rounds the scores differently from the eager graph and LRP amplifies that to ~2e-4, so
# the SDPA and eager copies are compared in float64 (there they agree to 1e-12).
for _name, _options in (("beit", dict(use_relative_position_bias=True)),
                        ("beit_shared_bias", dict(use_shared_relative_position_bias=True)),
                        ("beit_cls", dict(use_relative_position_bias=True, use_mean_pooling=False))):
    register(Case(_name, "image", hf_builder(tf.BeitConfig, tf.BeitForImageClassification, **VISION_CONFIG,
                                             **_options), image_inputs(), classes=5, sdpa_eager_dtype=torch.float64))

DINOV2_CONFIG = dict(VISION_CONFIG, mlp_ratio=2, layerscale_value=0.5)
register(Case("dinov2", "image", hf_builder(tf.Dinov2Config, tf.Dinov2ForImageClassification, **DINOV2_CONFIG),
              image_inputs(), classes=5))
register(Case("dinov2_registers", "image",
              hf_builder(tf.Dinov2WithRegistersConfig, tf.Dinov2WithRegistersForImageClassification,
                         num_register_tokens=2, **DINOV2_CONFIG), image_inputs(), classes=5))

# headless backbones: a similarity of the pooled embedding to a reference
register(Case("vit_backbone", "image", hf_builder(tf.ViTConfig, tf.ViTModel, **VISION_CONFIG), image_inputs(),
              target=similarity_target("pooler_output", 32)))
register(Case("dinov2_backbone", "image", hf_builder(tf.Dinov2Config, tf.Dinov2Model, **DINOV2_CONFIG),
              image_inputs(), target=similarity_target("pooler_output", 32)))

CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                 max_position_embeddings=40, bos_token_id=1, eos_token_id=3, pad_token_id=0)
register(Case("clip_image_encoder", "image",
              hf_builder(tf.CLIPVisionConfig, tf.CLIPVisionModelWithProjection, projection_dim=16, **CLIP_VISION),
              image_inputs(), target=similarity_target("image_embeds", 16)))


def clip_inputs(batch=3):
    """Images plus two prompts (the classes), the second right-padded; eos (3) ends each."""
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, 7] = ids[1, 4] = 3
    ids[1, 5:], mask[1, 5:] = 0, 0
    return {**image_inputs()(batch), "input_ids": ids, "attention_mask": mask}


register(Case("clip_zero_shot", "image",
              hf_builder(tf.CLIPConfig, tf.CLIPModel, projection_dim=16, vision_config=CLIP_VISION,
                         text_config=CLIP_TEXT),
              clip_inputs, classes=2, logits=lambda output: output.logits_per_image,
              attentions_of=lambda output: output.vision_model_output.attentions,
              shared=("input_ids", "attention_mask")))

# timm VisionTransformer variants
for _name, _options in (("timm_layerscale", dict(init_values=0.1)), ("timm_registers", dict(reg_tokens=4)),
                        ("timm_fc_norm", dict(fc_norm=True))):
    register(Case(_name, "image", _timm_build(**_options), image_inputs(), attentions=False, classes=5,
                  forward=_timm_forward, logits=lambda output: output))
