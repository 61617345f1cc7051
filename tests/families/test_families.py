"""Family-specific checks beyond the contract kit (tests/families/test_contract.py): relevance
conservation, DeiT's distillation token, timm layouts and wrappers, refused timm models."""
from __future__ import annotations

import pytest
import torch

import relprop

from tests.families.cases import CASES, _timm_build, randomize_timm

TEXT = ["bert", "roberta", "xlm_roberta", "distilbert"]


def _build(name, attn_implementation=None):
    """A stock family's model from its contract case (tiny config, strong random weights)."""
    return CASES[name].build(attn_implementation)


_randomize_timm = randomize_timm


def _build_timm(distilled=False, **options):
    """A small timm-layout ViT (or distilled DeiT) for 32x32 images with random weights."""
    return _timm_build(distilled, **options)(None)


def _inputs(name, batch=3):
    return CASES[name].inputs(batch)




@pytest.mark.parametrize("name", TEXT)
def test_paper_rules_conserve_relevance_to_the_encoder_input(name):
    """With the paper's rules every layer conserves relevance: the input relevance sums to 1."""
    model = _build(name)
    result = relprop.Explainer(model, dtype=torch.float64).explain(_inputs(name), "lrp", rules="paper", target=0)
    assert torch.allclose(result.relevance.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_deit_distillation_token_excluded():
    model = _build("deit_teacher")
    result = relprop.Explainer(model).explain(_inputs("deit_teacher"), "transformer_attribution")
    assert result.relevance.shape == (3, 16) and result.as_grid().shape == (3, 4, 4)


def test_timm_layout_logits(timm_style_vit, vit_inputs):
    x = vit_inputs["pixel_values"][:2]
    with torch.no_grad():
        expected = timm_style_vit(x)
    assert torch.allclose(relprop.Explainer(timm_style_vit).logits(x), expected, rtol=1e-5, atol=1e-5)


def test_real_timm_model(vit_inputs):
    timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision); "
                                              "the timm layout is tested through tests/timm_style.py")
    from tests.conftest import golden_file
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=4.0, qkv_bias=True)
    model.load_state_dict(golden_file("vit_small.weights.safetensors"))
    x = vit_inputs["pixel_values"][:1]
    ours = relprop.Explainer(model.eval(), dtype=torch.float64).explain(x, "transformer_attribution", target=9)
    reference = golden_file("vit_small.outputs_fp64.safetensors")["img0/pred/transformer_attribution_start0"]
    assert (ours.relevance - reference).abs().max() <= 1e-5 * reference.abs().max()


# -- timm models as timm and transformers hand them out -------------------------------------
def test_timm_wrapper_explained_like_the_wrapped_model(timm_style_vit, vit_inputs):
    """transformers' TimmWrapperForImageClassification (AutoModelForImageClassification of a
    timm checkpoint): its own forward's logits, the golden reference's maps, its config's labels."""
    from tests.conftest import golden_file
    from tests.timm_style import VisionTransformer, timm_wrapper
    model = timm_wrapper(VisionTransformer(), {i: f"class{i}" for i in range(10)})
    model.timm_model.load_state_dict(timm_style_vit.state_dict())
    model.eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    x = vit_inputs["pixel_values"][:2]
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    explainer = relprop.Explainer(model, dtype=torch.float64)
    assert torch.allclose(explainer.logits(x).float(), expected, rtol=1e-5, atol=1e-5)
    assert explainer.labels[9] == "class9"
    ours = explainer.explain(x[:1], "transformer_attribution", target="class9")
    reference = golden_file("vit_small.outputs_fp64.safetensors")["img0/pred/transformer_attribution_start0"]
    assert ours.target.tolist() == [9]
    assert (ours.relevance - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("wrapped", [False, True])
def test_timm_distilled_deit(wrapped):
    """timm's VisionTransformerDistilled: [CLS] and distillation tokens, logits = mean of the
    two heads (its inference forward, also while it trains with distillation)."""
    from tests.timm_style import timm_wrapper
    model = _build_timm(distilled=True)
    if wrapped:
        state = model.state_dict()
        model = timm_wrapper(model, {i: str(i) for i in range(5)})
        model.timm_model.load_state_dict(state)
    timm_model = model.timm_model if wrapped else model
    inputs = _inputs("vit")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits if wrapped else model(inputs["pixel_values"])
    model.train()
    timm_model.distilled_training = True
    with torch.no_grad():
        assert isinstance(timm_model(inputs["pixel_values"]), tuple)       # the training forward
    explainer = relprop.Explainer(model)
    assert torch.allclose(explainer.logits(inputs), expected, rtol=1e-5, atol=1e-5)
    for method in relprop.methods():
        result = explainer.explain(inputs, method, target=1)
        assert torch.isfinite(result.relevance).all()
        if method != "lrp":
            assert result.relevance.shape == (3, 16) and result.as_grid().shape == (3, 4, 4)


def test_unsupported_timm_models_named():
    from tests.timm_style import timm_wrapper
    pooled = _build_timm()
    pooled.global_pool = "avg"
    with pytest.raises(relprop.UnsupportedModelError, match="timm VisionTransformer is not supported.*global_pool=.avg."):
        relprop.Explainer(timm_wrapper(pooled, {0: "a", 1: "b"}))

    class ResNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

    with pytest.raises(relprop.UnsupportedModelError,
                       match="does not support TimmWrapperForImageClassification wrapping timm's ResNet"):
        relprop.Explainer(timm_wrapper(ResNet(), {0: "a", 1: "b"}))
