"""The timm family on real timm models, and the stand-ins in tests/timm_style.py checked
against them (runs where timm imports: it needs torchvision)."""
from __future__ import annotations

import pytest
import torch

import relprop
from tests.families.test_families import _inputs, _randomize_timm
from tests.conftest import golden_file

timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision); "
                                          "the timm layouts are tested through tests/timm_style.py")


def _distilled_pair():
    from tests.timm_style import VisionTransformerDistilled
    torch.manual_seed(0)
    real = _randomize_timm(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32,
                                             patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5))
    standin = VisionTransformerDistilled(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    standin.load_state_dict(real.state_dict())
    return real.eval(), standin.eval()


def test_real_distilled_deit():
    real, standin = _distilled_pair()
    assert type(real).__name__ == "VisionTransformerDistilled"
    x = _inputs("vit")["pixel_values"]
    with torch.no_grad():
        expected = real(x)
        assert torch.allclose(standin(x), expected, rtol=1e-5, atol=1e-5)       # the stand-in is faithful
    real.train()
    real.set_distilled_training(True)
    explainer = relprop.Explainer(real)
    assert torch.allclose(explainer.logits(x), expected, rtol=1e-5, atol=1e-5)
    for method in relprop.methods():
        ours = explainer.explain(x, method, target=1).relevance
        assert torch.equal(ours, relprop.Explainer(standin).explain(x, method, target=1).relevance)


def test_real_timm_wrapper(vit_inputs):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from tests.timm_style import VisionTransformer, timm_wrapper
    labels = {i: f"class{i}" for i in range(10)}
    config = TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=10, id2label=labels,
                               label2id={v: k for k, v in labels.items()},
                               model_args={"embed_dim": 64, "depth": 4, "num_heads": 4, "qkv_bias": True})
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(golden_file("vit_small.weights.safetensors"))
    model.eval()
    standin = timm_wrapper(VisionTransformer(), labels)
    standin.timm_model.load_state_dict(golden_file("vit_small.weights.safetensors"))
    standin.eval()
    x = vit_inputs["pixel_values"][:2]
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        assert torch.allclose(standin(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-5)
    explainer = relprop.Explainer(model, dtype=torch.float64)
    assert torch.allclose(explainer.logits(x).float(), expected, rtol=1e-5, atol=1e-5)
    ours = explainer.explain(x[:1], "transformer_attribution", target="class9")
    reference = golden_file("vit_small.outputs_fp64.safetensors")["img0/pred/transformer_attribution_start0"]
    assert (ours.relevance - reference).abs().max() <= 1e-5 * reference.abs().max()
