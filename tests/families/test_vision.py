"""Vision families beyond ViT / DeiT: what the methods' pooled row is for models whose head reads
several tokens (BEiT's mean of the patch tokens, DINOv2's [CLS] + patch mean, register tokens
left out), CLIP zero-shot prompts, headless backbones with callable targets, and the timm
variants relprop refuses. The contract kit (`test_contract.py`) runs every other check on
these families' cases (`cases_vision.py`)."""
from __future__ import annotations

import pytest
import torch

import relprop
from tests.families.cases import CASES, _timm_build


def _last_block(case_name, method="raw_attention", **options):
    case = CASES[case_name]
    inputs = case.inputs(2)
    result = relprop.Explainer(case.build(None), dtype=torch.float64).explain(
        inputs, method, target=case.target or 1, keep_internals=True, **options)
    return result, result.internals.attention


@pytest.mark.parametrize("name, prefix, cls_weight", [("beit", 1, 0.0), ("beit_cls", 1, 1.0),
                                                      ("dinov2", 1, 0.5), ("dinov2_registers", 3, 0.5)])
def test_pooled_row_is_what_the_head_reads(name, prefix, cls_weight):
    """raw_attention's map is the head-mean attention row the head reads: BEiT (mean pooling)
    the mean of the patch tokens' rows, BEiT without mean pooling the [CLS] row, DINOv2 half
    the [CLS] row plus half the patch tokens' mean row; register tokens are in neither."""
    result, attention = _last_block(name)
    a = attention[-1].mean(dim=1)                                   # [B, N, N]
    expected = cls_weight * a[:, 0] + (1 - cls_weight) * a[:, prefix:].mean(dim=1)
    assert result.relevance.shape == (2, 16)
    assert torch.allclose(result.relevance, expected[:, prefix:], rtol=1e-12, atol=0)


def test_rollout_of_a_mean_readout_adds_the_pooled_identity():
    """rollout with BEiT's mean readout: the mean of the patch rows of prod_l norm(Ā_l + I)."""
    result, attention = _last_block("beit", "rollout")
    eye = torch.eye(17, dtype=torch.float64)
    product = eye
    for a in attention:
        mixed = a.mean(dim=1) + eye
        product = (mixed / mixed.sum(-1, keepdim=True)) @ product
    expected = product[:, 1:].mean(dim=1)[:, 1:]
    assert torch.allclose(result.relevance, expected, rtol=1e-10, atol=0)


def test_mean_readout_gets_relevance_where_the_cls_row_gets_none():
    """BEiT's head never reads [CLS]: the [CLS] row of the last block's R_A is 0, and
    partial_lrp (the pooled rows of R_A) is not."""
    result, _ = _last_block("beit", "partial_lrp")
    relevance = result.internals.attention_relevance[1]
    assert (relevance[:, :, 0] == 0).all()
    assert result.relevance.abs().sum() > 0


def test_clip_zero_shot_scores_each_image_against_the_prompts():
    case = CASES["clip_zero_shot"]
    model, inputs = case.build(None), case.inputs(3)
    explainer = relprop.Explainer(model)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits_per_image
    assert explainer.logits(inputs).shape == (3, 2)
    result = explainer.explain(inputs, "lrp")
    assert result.relevance.shape == (3, 32, 32)                    # the pixels, not the prompts
    assert torch.equal(result.target, expected.argmax(dim=1))
    with pytest.raises(relprop.InputError, match="text prompts.*'input_ids'"):
        explainer.explain(inputs["pixel_values"], "rollout")
    with pytest.raises(relprop.InputError, match="prompt input_ids outside the model's vocabulary"):
        explainer.explain(dict(inputs, input_ids=inputs["input_ids"] + 1000), "rollout")
    with pytest.raises(relprop.InputError, match="target class out of range: the model has 2 classes"):
        explainer.explain(inputs, "rollout", target=2)


def test_headless_backbone_needs_a_callable_target():
    case = CASES["dinov2_backbone"]
    explainer = relprop.Explainer(case.build(None))
    with pytest.raises(relprop.InputError, match="outputs no class scores.*target=callable"):
        explainer.explain(case.inputs(2), "rollout", target=0)
    with pytest.raises(relprop.InputError, match="one score per sample"):
        explainer.explain(case.inputs(2), "rollout", target=lambda out: out.pooler_output)


@pytest.mark.parametrize("options, why", [(dict(global_pool="avg"), "global_pool='avg'"),
                                          (dict(class_token=False), "no class token")])
def test_timm_without_class_token_pooling_refused(options, why):
    with pytest.raises(relprop.UnsupportedModelError, match=f"timm VisionTransformer is not supported.*{why}"):
        relprop.Explainer(_timm_build(**options)())


@pytest.mark.parametrize("name", ["clip_vision_model", "dinov2_registers_backbone"])
def test_other_headless_classes_explained(name):
    """CLIPVisionModel and Dinov2WithRegistersModel (registered with their families, no contract
    case of their own): every method gives finite maps over the 16 patches for a callable target."""
    import transformers as tf

    from tests.families.cases import hf_builder, image_inputs
    from tests.families.cases_vision import CLIP_VISION, DINOV2_CONFIG, similarity_target
    if name == "clip_vision_model":
        model = hf_builder(tf.CLIPVisionConfig, tf.CLIPVisionModel, **CLIP_VISION)()
    else:
        model = hf_builder(tf.Dinov2WithRegistersConfig, tf.Dinov2WithRegistersModel, num_register_tokens=2,
                           **DINOV2_CONFIG)()
    explainer = relprop.Explainer(model)
    inputs, target = image_inputs()(2), similarity_target("pooler_output", 32)
    for method in relprop.methods():
        relevance = explainer.explain(inputs, method, target=target).relevance
        assert torch.isfinite(relevance).all()
        assert relevance.shape == ((2, 32, 32) if method == "lrp" else (2, 16)), method
