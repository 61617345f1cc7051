"""Explainer behaviour on the user's model: batching, leaving the model alone, errors."""
from __future__ import annotations


import pytest
import torch

import relprop
from relprop.errors import InputError, OptionError, UnknownMethodError, UnsupportedModelError

ALL_METHODS = relprop.methods()


def test_methods_registered():
    assert set(ALL_METHODS) == {"transformer_attribution", "rollout", "raw_attention", "attn_gradcam",
                                "partial_lrp", "lrp", "grad_rollout", "attnlrp", "cp_lrp"}


def test_methods_function_does_not_shadow_a_subpackage():
    import importlib

    import relprop
    # relprop.methods() is the discovery function; the method modules live in relprop.attributions
    assert callable(relprop.methods) and relprop.methods() == relprop.attributions.method_names()
    assert importlib.import_module("relprop.attributions.rollout").__name__ == "relprop.attributions.rollout"


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
    ids, mask, lengths = _mixed_length_bert_batch()
    targets = torch.tensor([0, 1, 1, 0])
    batch = explainer.explain({"input_ids": ids, "attention_mask": mask}, method, target=targets)
    for i, n in enumerate(lengths):
        single = explainer.explain({"input_ids": ids[i:i + 1, :n]}, method, target=int(targets[i]))
        scale = single.relevance.abs().max()
        assert (batch.relevance[i, :n] - single.relevance[0]).abs().max() <= 1e-6 * scale
        assert torch.all(batch.relevance[i, n:] == 0)


def _mixed_length_bert_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [24, 9, 17, 5]
    ids = torch.zeros(4, 24, dtype=torch.long)
    mask = torch.zeros(4, 24, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, 200, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 2, 3
        mask[i, :n] = 1
    return ids, mask, lengths


@pytest.mark.parametrize("method", ["rollout", "raw_attention", "grad_rollout"])
def test_float32_batch_equals_single_for_attention_methods(vit_model, bert_model, vit_inputs, method):
    """In float32 the attention and gradient×attention methods agree to rounding (measured
    <= 7e-6; the LRP-based ones do not, see the next test)."""
    x = vit_inputs["pixel_values"]
    vit = relprop.Explainer(vit_model)
    batch = vit.explain(x, method, target=3).relevance
    for i in range(4):
        single = vit.explain(x[i:i + 1], method, target=3).relevance[0]
        assert (batch[i] - single).abs().max() <= 1e-4 * single.abs().max()
    ids, mask, lengths = _mixed_length_bert_batch()
    bert = relprop.Explainer(bert_model)
    batch = bert.explain({"input_ids": ids, "attention_mask": mask}, method, target=1).relevance
    for i, n in enumerate(lengths):
        single = bert.explain(ids[i:i + 1, :n], method, target=1).relevance[0]
        assert (batch[i, :n] - single).abs().max() <= 1e-4 * single.abs().max()


def test_lrp_maps_amplify_rounding_sized_changes(bert_model):
    """Why a float32 batch can differ from its samples for the LRP-based methods: batching
    changes float32 rounding (matrix kernels and reductions differ with the number of rows and
    the padded length), ~1e-7 relative, and LRP's divisions by residual sums that nearly cancel
    amplify that ~1e4-fold. Shown exactly in float64: a 1e-7 relative change of the embeddings
    moves this text's full-LRP map by > 1e-3, its attention maps by < 1e-6."""
    import copy
    model = copy.deepcopy(bert_model).double()
    explainer = relprop.Explainer(model)
    ids, _, lengths = _mixed_length_bert_batch(seed=55)
    text = ids[1:2, :lengths[1]]
    methods = ["lrp", "rollout", "raw_attention", "transformer_attribution"]
    before = {m: explainer.explain(text, m, target=1).relevance for m in methods}
    weight = model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight.mul_(1 + 1e-7 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=weight.dtype))
    change = {m: ((explainer.explain(text, m, target=1).relevance - before[m]).abs().max()
                  / before[m].abs().max()).item() for m in methods}
    assert change["lrp"] > 1e-3
    assert max(change["rollout"], change["raw_attention"], change["transformer_attribution"]) < 1e-6


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


# -- targets by label name -----------------------------------------------------------------
def _named_vit():
    from tests.families.test_families import _build
    model = _build("vit").eval()
    model.config.id2label = {0: "cat", 1: "dog", 2: "ship", 3: "Truck", 4: "horse"}
    return model


def test_target_label_names():
    from tests.families.test_families import _inputs
    explainer = relprop.Explainer(_named_vit())
    x = _inputs("vit")["pixel_values"]                      # 3 images
    assert explainer.explain(x, "rollout", target="dog").target.tolist() == [1, 1, 1]
    assert explainer.explain(x, "rollout", target=["ship", 0, "horse"]).target.tolist() == [2, 0, 4]
    assert explainer.explain(x, "rollout", target=("truck", "Truck", 3)).target.tolist() == [3, 3, 3]
    assert explainer.class_index("cat") == 0 and explainer.class_index(4) == 4
    by_name = explainer.explain(x, "transformer_attribution", target="dog").relevance
    assert torch.equal(by_name, explainer.explain(x, "transformer_attribution", target=1).relevance)


@pytest.mark.parametrize("target,phrases", [
    ("dgo", ["unknown label 'dgo'", "Did you mean 'dog'", "0: 'cat'", "class index"]),
    (["cat", "zebra", 1], ["unknown label 'zebra'"]),
    ([1.5, "cat", 0], ["int index or a label name", "float"]),
])
def test_unknown_label_lists_the_models_labels(target, phrases):
    from tests.families.test_families import _inputs
    with pytest.raises(InputError) as error:
        relprop.Explainer(_named_vit()).explain(_inputs("vit"), "rollout", target=target)
    for phrase in phrases:
        assert phrase in str(error.value)


def test_label_on_a_model_without_label_names(timm_style_vit, vit_inputs):
    with pytest.raises(InputError, match="no label names.*class index"):
        relprop.Explainer(timm_style_vit).explain(vit_inputs["pixel_values"][:1], target="cat")


def test_many_labels_are_abbreviated(vit_model, vit_inputs):
    with pytest.raises(InputError, match=r"0: 'LABEL_0', 1: 'LABEL_1'.*9: 'LABEL_9'; or pass a class index"):
        relprop.Explainer(vit_model).explain(vit_inputs["pixel_values"][:1], target="LABEL_10")
    model = _named_vit()
    model.config.id2label = {i: f"c{i}" for i in range(25)}
    with pytest.raises(InputError, match=r"9: 'c9', \.\.\. \(25 classes\)"):
        relprop.Explainer(model).class_index("c99")


# -- a text result is not an image ---------------------------------------------------------
@pytest.mark.parametrize("method", ["transformer_attribution", "lrp"])
def test_image_helpers_on_a_text_result(bert_model, method):
    result = relprop.Explainer(bert_model).explain(torch.tensor([[2, 10, 20, 3]]), method)
    for helper in (result.upsampled, result.as_grid):
        with pytest.raises(InputError, match=r"is for image explanations; this one is of a text model.*\.relevance"):
            helper()
    assert result.normalized().shape == (1, 4)


# -- dtypes, devices, weights --------------------------------------------------------------
@pytest.mark.parametrize("dtype,why", [(torch.int64, "floating point"), (torch.float16, "half precision"),
                                       (torch.bfloat16, "half precision"), ("float64", "float")])
def test_unsupported_compute_dtype(vit_model, dtype, why):
    with pytest.raises(OptionError, match=f"{why}.*use dtype=torch.float32 or torch.float64"):
        relprop.Explainer(vit_model, dtype=dtype)


def test_not_a_module():
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module.*got str"):
        relprop.Explainer("google/vit-base-patch16-224")


@pytest.mark.parametrize("partly", [False, True])
def test_meta_device_model_refused(partly):
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=5)
    if partly:
        model = ViTForImageClassification(config)
        model.classifier = torch.nn.Linear(32, 5, device="meta")
    else:
        with torch.device("meta"):
            model = ViTForImageClassification(config)
    with pytest.raises(UnsupportedModelError, match="'meta' device.*load real weights first"):
        relprop.Explainer(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_model_spread_over_devices_refused():
    from tests.families.test_families import _build
    model = _build("vit")
    model.classifier.cuda()
    with pytest.raises(UnsupportedModelError, match=r"several devices \(cpu, cuda:0\).*model.to\('cuda:0'\)"):
        relprop.Explainer(model)


def test_integer_weights_refused():
    from tests.families.test_families import _build
    model = _build("vit")
    model.classifier.weight = torch.nn.Parameter(torch.zeros(5, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="dtype torch.int8.*floating-point weights"):
        relprop.Explainer(model)


def test_mixed_dtype_weights_computed_in_float32():
    """Half-precision parts (e.g. a head kept in float16) are read in float32: the result is
    that of the same model converted to float32."""
    import copy

    from tests.families.test_families import _build, _inputs
    model = _build("vit").eval()
    model.classifier.half()
    model.vit.layernorm.double()
    converted = copy.deepcopy(model).float()
    inputs = _inputs("vit")
    for method in ALL_METHODS:
        ours = relprop.Explainer(model).explain(inputs, method, target=1)
        assert ours.relevance.dtype == torch.float32
        assert torch.equal(ours.relevance, relprop.Explainer(converted).explain(inputs, method, target=1).relevance)


# -- subclasses of supported models --------------------------------------------------------
def test_subclasses_of_supported_models_accepted(timm_style_vit, vit_inputs):
    from transformers import BertForSequenceClassification, ViTForImageClassification

    from tests.families.test_families import _build, _inputs
    from tests.timm_style import VisionTransformer

    class MyViT(ViTForImageClassification):
        pass

    class MyBert(BertForSequenceClassification):
        pass

    class MyTimmViT(VisionTransformer):                     # a differently named timm subclass
        pass

    for name, cls in (("vit", MyViT), ("bert", MyBert)):
        reference = _build(name).eval()
        model = cls(reference.config).eval()
        model.load_state_dict(reference.state_dict())
        inputs = _inputs(name)
        with torch.no_grad():
            expected = model(**inputs).logits
        assert torch.allclose(relprop.Explainer(model).logits(inputs), expected, rtol=1e-5, atol=1e-5)
    timm_sub = MyTimmViT().eval()
    timm_sub.load_state_dict(timm_style_vit.state_dict())
    x = vit_inputs["pixel_values"][:2]
    with torch.no_grad():
        assert torch.allclose(relprop.Explainer(timm_sub).logits(x), timm_sub(x), rtol=1e-5, atol=1e-5)


def test_lookalike_class_name_alone_is_not_enough():
    class ViTForImageClassification(torch.nn.Module):      # the name, not the model
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)

    with pytest.raises(UnsupportedModelError, match="does not support ViTForImageClassification"):
        relprop.Explainer(ViTForImageClassification())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_model_explained_like_on_cpu(vit_model, vit_inputs):
    import copy
    gpu_model = copy.deepcopy(vit_model).cuda()
    x = vit_inputs["pixel_values"][:2]
    cpu = relprop.Explainer(vit_model, dtype=torch.float64)
    gpu = relprop.Explainer(gpu_model, dtype=torch.float64)
    for method in ALL_METHODS:
        ours = gpu.explain(x, method, target=[3, 7])             # CPU inputs go to the model's device
        assert ours.relevance.device.type == "cuda"
        expected = cpu.explain(x, method, target=[3, 7]).relevance
        assert (ours.relevance.cpu() - expected).abs().max() <= 1e-6 * expected.abs().max(), method
    with torch.no_grad():
        gpu_model.classifier.weight.mul_(-1)
    assert torch.equal(gpu.logits(x), relprop.Explainer(gpu_model, dtype=torch.float64).logits(x))
