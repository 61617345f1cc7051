"""An `Explainer` explains the model as it is at each call: after any change of the model's
weights (in place or replaced, of every kind of parameter) its explanation equals a fresh
Explainer's, in float32 (the model's own weights) and float64 (a copy)."""
from __future__ import annotations

import pytest
import torch

import relprop
from tests.families.test_families import _build, _build_timm, _inputs

DTYPES = [pytest.param(None, id="float32"), pytest.param(torch.float64, id="float64")]


# each covers a family's kinds of parameters: HF ViT (patch embedding, [CLS], positions, q/k/v,
# out, fc1/fc2, norms, final norm, classifier), HF DeiT with teacher (+ distillation token, two
# heads), timm's distilled DeiT (fused qkv, cls/dist tokens, head/head_dist), BERT (word/position/
# token-type embeddings, embedding LayerNorm, pooler, classifier), DistilBERT (pre_classifier)
MODELS = {"vit": lambda: _build("vit"), "deit_teacher": lambda: _build("deit_teacher"),
          "timm_distilled": lambda: _build_timm(distilled=True), "bert": lambda: _build("bert"), "distilbert": lambda: _build("distilbert")}


def _model_inputs(name):
    return _inputs("vit" if name == "timm_distilled" else name)


def _explain(explainer, inputs):
    # full LRP reads every weight: the forward, the whole propagation, the input layer
    result = explainer.explain(inputs, "lrp", target=1)
    return result.logits, result.relevance


def _assert_same_as_fresh(explainer, model, inputs, dtype, what):
    logits, relevance = _explain(explainer, inputs)
    fresh_logits, fresh_relevance = _explain(relprop.Explainer(model, dtype=dtype), inputs)
    assert torch.equal(logits, fresh_logits), f"{what}: logits of the old explainer are stale"
    assert torch.equal(relevance, fresh_relevance), f"{what}: relevance of the old explainer is stale"
    return logits, relevance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_in_place_update_of_every_parameter_is_seen(name, dtype):
    model = MODELS[name]()
    inputs = _model_inputs(name)
    explainer = relprop.Explainer(model, dtype=dtype)
    before = _explain(explainer, inputs)
    gen = torch.Generator().manual_seed(2)
    names = [n for n, _ in model.named_parameters()]
    for param_name, param in model.named_parameters():
        with torch.no_grad():
            param.add_(0.3 * torch.randn(param.shape, generator=gen) * (param.abs().mean() + 0.1))
        after = _assert_same_as_fresh(explainer, model, inputs, dtype, param_name)
        # the update mattered (else the test could not fail)
        assert not (torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])), param_name
        before = after
    assert len(names) > 20


def _vit_pair(dtype):
    model = _build("vit")
    return model, relprop.Explainer(model, dtype=dtype), _inputs("vit")


def _no_grad_add(model):
    with torch.no_grad():
        model.vit.embeddings.cls_token.add_(0.5)


def _inference_mode_update(model):
    with torch.inference_mode():
        model.classifier.weight.mul_(-1.5)
        model.vit.embeddings.position_embeddings.add_(0.3)


def _load_state_dict(model):
    other = _build("vit")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.3)
    model.load_state_dict(other.state_dict())


def _optimizer_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(**_inputs("vit")).logits[:, 1].sum().backward()
    optimizer.step()
    model.zero_grad()


def _adam_step(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model(**_inputs("vit")).logits[:, 2].sum().backward()
    optimizer.step()


def _assign_data(model):
    layer = model.vit.layers[0].mlp.fc1 if hasattr(model.vit, "layers") else model.vit.encoder.layer[0].intermediate.dense
    layer.weight.data = torch.randn_like(layer.weight)
    model.vit.embeddings.cls_token.data = torch.randn_like(model.vit.embeddings.cls_token)


def _replace_parameter(model):
    model.vit.layernorm.weight = torch.nn.Parameter(torch.rand_like(model.vit.layernorm.weight) + 0.5)


def _replace_module(model):
    torch.manual_seed(5)
    model.classifier = torch.nn.Linear(model.classifier.in_features, model.classifier.out_features)


def _to_float64(model):
    model.double()


MECHANISMS = {"no_grad add_": _no_grad_add, "inference_mode": _inference_mode_update,
              "load_state_dict": _load_state_dict, "SGD step": _optimizer_step, "Adam step": _adam_step,
              "p.data = new": _assign_data, "new Parameter": _replace_parameter, "new module": _replace_module,
              "model.double()": _to_float64}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_every_way_of_changing_weights_is_seen(mechanism, dtype):
    model, explainer, inputs = _vit_pair(dtype)
    before = _explain(explainer, inputs)
    MECHANISMS[mechanism](model)
    x = inputs if mechanism != "model.double()" else {"pixel_values": inputs["pixel_values"].double()}
    after = _assert_same_as_fresh(explainer, model, x, dtype, mechanism)
    if mechanism == "model.double()":
        # the same values in float64: a default explainer now computes in float64 too
        assert after[1].dtype == torch.float64
    else:
        assert not torch.equal(after[1], before[1])


def test_float32_sees_changes_through_data_and_float64_after_refresh():
    """``p.data.add_`` bypasses the version counter: the float32 explainer reads the model's
    own weights and sees it anyway; the float64 copy needs ``refresh()`` (documented)."""
    model, explainer32, inputs = _vit_pair(None)
    explainer64 = relprop.Explainer(model, dtype=torch.float64)
    _explain(explainer64, inputs)
    for param in (model.vit.embeddings.cls_token, model.vit.embeddings.patch_embeddings.projection.weight,
                  model.classifier.weight):
        param.data.add_(0.5)
    _assert_same_as_fresh(explainer32, model, inputs, None, "p.data.add_ (float32)")
    explainer64.refresh()
    _assert_same_as_fresh(explainer64, model, inputs, torch.float64, "p.data.add_ (float64, refreshed)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_built_under_inference_mode_is_re_read_at_every_call(dtype):
    """Inference tensors keep no version counter: their weights are re-read at each call."""
    with torch.inference_mode():
        model = _build("vit").eval()
    inputs = _inputs("vit")
    explainer = relprop.Explainer(model, dtype=dtype)
    before = _explain(explainer, inputs)
    with torch.inference_mode():
        model.classifier.weight.mul_(2)
    after = _assert_same_as_fresh(explainer, model, inputs, dtype, "inference tensors")
    assert not torch.equal(before[0], after[0])
    for method in ("transformer_attribution", "grad_rollout"):      # autograd through the weights
        assert torch.equal(explainer.explain(inputs, method).relevance,
                           relprop.Explainer(model, dtype=dtype).explain(inputs, method).relevance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_re_read_inside_inference_mode_work_with_autograd(dtype):
    model, explainer, inputs = _vit_pair(dtype)
    with torch.inference_mode():
        explainer.explain(inputs, "transformer_attribution")
        model.vit.embeddings.position_embeddings.mul_(1.5)
        ours = explainer.explain(inputs, "transformer_attribution").relevance     # re-read in inference mode
    assert torch.equal(ours, relprop.Explainer(model, dtype=dtype).explain(inputs, "transformer_attribution").relevance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_train_flag_and_attention_implementation_do_not_matter(name, dtype):
    model = _build(name)                            # training mode, SDPA
    inputs = _inputs(name)
    explainer = relprop.Explainer(model, dtype=dtype)
    first = _explain(explainer, inputs)
    model.eval()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    second = _assert_same_as_fresh(explainer, model, inputs, dtype, "eval + eager")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_unchanged_float64_model_is_not_copied_again(monkeypatch):
    model, explainer, inputs = _vit_pair(torch.float64)
    calls = []
    original = type(explainer)._reread
    monkeypatch.setattr(type(explainer), "_reread", lambda self, retrace: (calls.append(1), original(self, retrace)))
    for _ in range(3):
        explainer.explain(inputs, "rollout")
        explainer.logits(inputs)
    assert calls == []
    with torch.no_grad():
        model.classifier.bias.add_(1)
    explainer.logits(inputs)
    assert calls == [1]


def test_float32_explainer_holds_views_not_copies():
    """The default explainer computes on the model's own storage (no per-call weight copy)."""
    model, explainer, _ = _vit_pair(None)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    used = list(explainer.weights.values())
    assert len(used) == len(dict(model.named_parameters()))
    assert all(t.untyped_storage().data_ptr() in storages for t in used)


def test_labels_follow_the_config():
    model = _build("vit")
    explainer = relprop.Explainer(model)
    model.config.id2label = {i: f"class {i}" for i in range(5)}
    assert explainer.labels[3] == "class 3"
    assert explainer.explain(_inputs("vit"), "rollout", target="class 3").target.tolist() == [3, 3, 3]
