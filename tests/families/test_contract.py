"""The contract every supported family keeps, checked on every case registered in `cases`:

the engine's logits equal the model's own; A and ∇A equal the eager model's attentions and
their gradients; SDPA and eager models are explained alike; batch = single in float64 (mixed
text lengths); padded positions exactly 0; finite maps for zero / constant / huge inputs; the
user's model untouched (also after an export failure); works under no_grad / inference_mode.
"""
from __future__ import annotations

import collections

import pytest
import torch

import relprop
from relprop import graph
from tests.families.cases import CASES

NAMES = list(CASES)


def _explain_all(explainer, inputs, case, **kwargs):
    target = case.target if case.target is not None else kwargs.pop("target", 1)
    return {m: explainer.explain(inputs, m, target=target, **kwargs) for m in relprop.methods()}


def _target(case, batch):
    return case.target if case.target is not None else [i % case.classes for i in range(batch)]


def _model_scores(case, output, inputs):
    """The model's own class scores [B, classes] (a causal LM: its logits at each sample's last real token)."""
    scores = case.logits(output)
    if case.scores_at_last:
        mask = inputs["attention_mask"].bool()
        last = torch.where(mask, torch.arange(mask.shape[1]), -1).amax(dim=1)
        scores = scores[torch.arange(scores.shape[0]), last]
    return scores


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_models_own(name):
    case = CASES[name]
    model = case.build(None)
    inputs = case.inputs(3)
    explainer = relprop.Explainer(model)
    model.eval()
    with torch.no_grad():
        own = case.forward(model, inputs)
    if case.target is None:
        expected, ours = _model_scores(case, own, inputs), explainer.logits(inputs)
    else:       # headless: the explained score, from the output the engine hands a callable target
        seen = []
        explainer.explain(inputs, "raw_attention", target=lambda out: seen.append(out) or case.target(out))
        expected, ours = case.target(own), case.target(seen[0])
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].attentions])
def test_attention_and_gradients_equal_eager_model(name):
    case = CASES[name]
    model = case.build("eager").eval()
    inputs = case.inputs(3)
    target = torch.tensor([0, 1, 2]) % case.classes
    out = model(**inputs, output_attentions=True)
    attentions = case.attentions_of(out)
    for a in attentions:
        a.retain_grad()
    if case.target is not None:
        target = case.target
        target(out).sum().backward()
    else:
        _model_scores(case, out, inputs).gather(1, target[:, None]).sum().backward()
    internals = relprop.Explainer(model, dtype=torch.float64).explain(
        inputs, "grad_rollout", target=target, keep_internals=True).internals
    assert len(internals.attention) == len(attentions)
    valid = case.per_sample(inputs).get("attention_mask", torch.ones(3, attentions[0].shape[-1])).bool()
    for block, reference in enumerate(attentions):
        keep = valid[:, None, :, None] & valid[:, None, None, :]          # padded rows are arbitrary
        ours_a = internals.attention[block].float()
        assert torch.allclose(ours_a * keep, reference * keep, atol=1e-5)
        grad = internals.attention_grad[block].float()
        assert torch.allclose(grad * keep, reference.grad * keep, atol=1e-5 * reference.grad.abs().max())


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].attentions and CASES[n].sdpa])
def test_sdpa_model_explained_like_eager_copy(name):
    case = CASES[name]
    sdpa, eager = case.build(None), case.build("eager")
    inputs = case.inputs(3)
    ours = _explain_all(relprop.Explainer(sdpa, dtype=case.sdpa_eager_dtype), inputs, case)
    theirs = _explain_all(relprop.Explainer(eager, dtype=case.sdpa_eager_dtype), inputs, case)
    for method in ours:
        assert torch.allclose(ours[method].relevance, theirs[method].relevance, rtol=1e-5,
                              atol=1e-6 * theirs[method].relevance.abs().max()), method
    assert sdpa.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", NAMES)
def test_float64_batch_equals_single(name):
    """Every method: a batch (text: with a padded sample; decoders: right and left padding)
    gives each sample's map alone to <= 1e-6 in float64, and padded positions get exactly 0."""
    case = CASES[name]
    explainer = relprop.Explainer(case.build(None), dtype=torch.float64)
    for inputs in [case.inputs(3)] + ([case.left_inputs(3)] if case.left_inputs is not None else []):
        own = case.per_sample(inputs)
        masks = own["attention_mask"].bool() if "attention_mask" in own else [None] * 3
        for method in relprop.methods():
            batch = explainer.explain(inputs, method, target=_target(case, 3)).relevance
            for i, real in enumerate(masks):
                alone = {k: v[i:i + 1] if real is None else v[i:i + 1, real]
                         for k, v in own.items() if k != "attention_mask"}
                alone.update({k: inputs[k] for k in case.shared})
                target = case.target if case.target is not None else i % case.classes
                single = explainer.explain(alone, method, target=target).relevance[0]
                ours = batch[i] if real is None else batch[i, real]
                assert (ours - single).abs().max() <= 1e-6 * single.abs().max(), (method, i)
                if real is not None:
                    assert (batch[i, ~real] == 0).all(), (method, i)


def _degenerate_inputs(case):
    inputs = case.inputs(2)
    if case.modality == "image":
        x = inputs["pixel_values"]
        shared = {k: inputs[k] for k in case.shared}
        return [{"pixel_values": torch.zeros_like(x), **shared}, {"pixel_values": torch.full_like(x, 0.5), **shared},
                {"pixel_values": x * 1e4, **shared}]
    same = dict(inputs, input_ids=inputs["input_ids"][:, :1].expand_as(inputs["input_ids"]).clone())
    return [same]


@pytest.mark.parametrize("name", NAMES)
def test_finite_for_zero_constant_and_huge_inputs(name):
    case = CASES[name]
    explainer = relprop.Explainer(case.build(None))
    for inputs in _degenerate_inputs(case):
        for method, result in _explain_all(explainer, inputs, case).items():
            assert torch.isfinite(result.relevance).all(), method


def _snapshot(model):
    return {
        "state": {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "grads": [p.grad for p in model.parameters()],
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key, (value, requires_grad) in before["state"].items():
        assert torch.equal(value, after["state"][key][0]) and requires_grad == after["state"][key][1], key
    assert before["training"] == after["training"] and before["hooks"] == after["hooks"]
    assert before["attn"] == after["attn"]
    assert all(g is None for g in after["grads"])


@pytest.mark.parametrize("name", NAMES)
def test_model_untouched_also_after_an_export_failure(name, monkeypatch):
    case = CASES[name]
    model = case.build(None)           # training mode, as built
    before = _snapshot(model)
    inputs = case.inputs(2)
    _explain_all(relprop.Explainer(model), inputs, case)
    _assert_same(before, _snapshot(model))

    def failing_export(*args, **kwargs):
        raise RuntimeError("simulated tracing failure")

    monkeypatch.setattr(torch.export, "export", failing_export)
    monkeypatch.setattr(graph, "_TRACERS", collections.OrderedDict())     # no shared export to reuse
    fresh = case.build(None)
    before = _snapshot(fresh)
    with pytest.raises(relprop.UnsupportedModelError, match="could not trace.*simulated tracing failure"):
        relprop.Explainer(fresh).explain(inputs, "rollout", target=_target(case, 2))
    _assert_same(before, _snapshot(fresh))


@pytest.mark.parametrize("name", NAMES)
def test_works_under_no_grad_and_inference_mode(name):
    case = CASES[name]
    explainer = relprop.Explainer(case.build(None))
    inputs = case.inputs(2)
    reference = _explain_all(explainer, inputs, case)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            made_inside = {k: v.clone() for k, v in inputs.items()}
            for method, result in _explain_all(explainer, made_inside, case).items():
                assert torch.equal(result.relevance, reference[method].relevance), (method, context)
