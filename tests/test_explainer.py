"""Explainer behaviour on the user's model: batching, leaving the model alone, errors."""
from __future__ import annotations


import pytest
import torch

import relprop
from relprop.errors import InputError, OptionError, UnknownMethodError, UnsupportedModelError

ALL_METHODS = relprop.methods()


def test_methods_registered():
    assert set(ALL_METHODS) == {"transformer_attribution", "rollout", "raw_attention", "attn_gradcam",
                                "partial_lrp", "lrp", "grad_rollout"}


# -- batch = per sample --------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
def test_vit_batch_equals_single(vit_model, vit_inputs, method):
    explainer = relprop.Explainer(vit_model, dtype=torch.float64)
    x = vit_inputs["pixel_values"]
    targets = torch.tensor([3, 7, 0, 9])
    batch = explainer.explain(x, method, target=targets)
    for i in range(4):
        single = explainer.explain(x[i:i + 1], method, target=int(targets[i]))
        scale = single.relevance.abs().max()
        assert (batch.relevance[i] - single.relevance[0]).abs().max() <= 1e-6 * scale
    assert batch.target.tolist() == targets.tolist()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bert_mixed_length_batch_equals_unpadded_single(bert_model, method):
    explainer = relprop.Explainer(bert_model, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    lengths = [24, 9, 17, 5]
    ids = torch.zeros(4, 24, dtype=torch.long)
    mask = torch.zeros(4, 24, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, 200, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 2, 3
        mask[i, :n] = 1
    targets = torch.tensor([0, 1, 1, 0])
    batch = explainer.explain({"input_ids": ids, "attention_mask": mask}, method, target=targets)
    for i, n in enumerate(lengths):
        single = explainer.explain({"input_ids": ids[i:i + 1, :n]}, method, target=int(targets[i]))
        scale = single.relevance.abs().max()
        assert (batch.relevance[i, :n] - single.relevance[0]).abs().max() <= 1e-6 * scale
        assert torch.all(batch.relevance[i, n:] == 0)


# -- the model is left alone ---------------------------------------------------------------
def _snapshot(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for k, m in model.named_modules()},
        "attn": model.config._attn_implementation,
    }


@pytest.mark.parametrize("training", [False, True])
def test_model_untouched(vit_folder, vit_inputs, training):
    from transformers import ViTForImageClassification
    model = ViTForImageClassification.from_pretrained(vit_folder)     # default attention (SDPA)
    model.train(training)
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    before = _snapshot(model)
    explainer = relprop.Explainer(model)
    for method in ALL_METHODS:
        explainer.explain(vit_inputs["pixel_values"][:2], method)
    after = _snapshot(model)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["attn"] == after["attn"]
    assert all(after["grads"][k] is None for k in after["grads"])
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])


def test_works_under_no_grad_and_inference_mode(vit_model, vit_inputs):
    explainer = relprop.Explainer(vit_model)
    x = vit_inputs["pixel_values"][:1]
    reference = explainer.explain(x).relevance
    with torch.no_grad():
        assert torch.equal(explainer.explain(x).relevance, reference)
    with torch.inference_mode():
        assert torch.equal(explainer.explain(x).relevance, reference)
        inference_tensor = x.clone()                 # created in inference mode
        for method in ALL_METHODS:
            assert torch.isfinite(explainer.explain(inference_tensor, method).relevance).all()


def test_training_mode_model_is_explained_with_inference_behaviour(bert_folder):
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(bert_folder)   # dropout 0.1, training mode
    model.train()
    ids = torch.tensor([[2, 10, 20, 30, 3]])
    explainer = relprop.Explainer(model)
    first = explainer.explain(ids).relevance
    assert torch.equal(explainer.explain(ids).relevance, first)            # no dropout
    assert model.training
    model.eval()
    with torch.no_grad():
        assert torch.allclose(explainer.logits(ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


# -- targets -------------------------------------------------------------------------------
def test_target_forms(vit_model, vit_inputs):
    explainer = relprop.Explainer(vit_model)
    x = vit_inputs["pixel_values"][:2]
    predicted = explainer.explain(x)
    assert predicted.target.tolist() == predicted.logits.argmax(1).tolist()
    assert explainer.explain(x, target=4).target.tolist() == [4, 4]
    assert explainer.explain(x, target=[1, 2]).target.tolist() == [1, 2]
    assert explainer.explain(x, target=torch.tensor([5, 6])).target.tolist() == [5, 6]


@pytest.mark.parametrize("target,message", [(10, "out of range"), (-1, "out of range"), ([1, 2, 3], "3 entries"),
                                            (1.5, "integer"), (True, "bool")])
def test_bad_targets(vit_model, vit_inputs, target, message):
    with pytest.raises(InputError, match=message):
        relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:2], target=target)


# -- clear errors --------------------------------------------------------------------------
def test_unsupported_model_names_supported_families():
    with pytest.raises(UnsupportedModelError, match="ViTForImageClassification.*BertForSequenceClassification"):
        relprop.Explainer(torch.nn.Linear(3, 3))


def test_unknown_method_suggests(vit_model, vit_inputs):
    with pytest.raises(UnknownMethodError, match="Did you mean 'rollout'"):
        relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], "rolout")


def test_unknown_option(vit_model, vit_inputs):
    with pytest.raises(OptionError, match="no option 'start_layr'.*'start_layer'"):
        relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], start_layr=1)
    with pytest.raises(OptionError, match="start_layer must be"):
        relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], start_layer=4)
    with pytest.raises(ValueError, match="unknown rules"):
        relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], "lrp", rules="zplus")


@pytest.mark.parametrize("shape,message", [((3, 224, 224), "4 dimensions.*unsqueeze"), ((1, 1, 224, 224), "3 channels"),
                                           ((1, 3, 128, 128), "224x224"), ((0, 3, 224, 224), "empty")])
def test_bad_image_shapes(vit_model, shape, message):
    with pytest.raises(InputError, match=message):
        relprop.Explainer(vit_model).explain(torch.zeros(shape))


def test_integer_images_rejected(vit_model):
    with pytest.raises(InputError, match="floating point"):
        relprop.Explainer(vit_model).explain(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


@pytest.mark.parametrize("inputs,message", [
    ({"input_ids": torch.tensor([2, 5, 3])}, "batch dimension"),
    ({"input_ids": torch.tensor([[2, 500, 3]])}, "vocabulary"),
    ({"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.tensor([[1, 1]])}, "shape"),
    ({"input_ids": torch.tensor([[0, 2, 5]]), "attention_mask": torch.tensor([[0, 1, 1]])}, "right padding"),
    ({"input_ids": torch.full((1, 80), 5)}, "too long"),
    ({"text": "hello"}, "input_ids"),
])
def test_bad_text_inputs(bert_model, inputs, message):
    with pytest.raises(InputError, match=message):
        relprop.Explainer(bert_model).explain(inputs)


# -- numerically safe on degenerate inputs -------------------------------------------------
@pytest.mark.parametrize("fill", ["zeros", "constant", "large"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_no_nan_or_inf_on_degenerate_images(vit_model, method, fill):
    x = {"zeros": torch.zeros(2, 3, 224, 224), "constant": torch.full((2, 3, 224, 224), 0.7),
         "large": torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 1e3}[fill]
    result = relprop.Explainer(vit_model).explain(x, method)
    assert torch.isfinite(result.relevance).all()
    assert torch.isfinite(result.upsampled()).all()
    assert torch.isfinite(relprop.normalize(result.relevance)).all()


def test_non_finite_logits_reported(vit_model):
    x = torch.zeros(2, 3, 224, 224)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"not finite for sample\(s\) \[1\]"):
        relprop.Explainer(vit_model).explain(x)


# -- result helpers ------------------------------------------------------------------------
def test_result_helpers(vit_model, vit_inputs):
    result = relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:2])
    assert result.relevance.shape == (2, 196)
    assert result.as_grid().shape == (2, 14, 14)
    up = result.upsampled()
    assert up.shape == (2, 224, 224)
    expected = torch.nn.functional.interpolate(result.as_grid()[:, None], scale_factor=16, mode="bilinear")[:, 0]
    assert torch.allclose(up, expected)
    norm = result.normalized()
    assert torch.allclose(norm.amin(1), torch.zeros(2)) and torch.allclose(norm.amax(1), torch.ones(2))
    pixels = relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], "lrp")
    assert pixels.relevance.shape == (1, 224, 224) and pixels.upsampled().shape == (1, 224, 224)
