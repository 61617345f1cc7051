"""The graph engine: exports paid once per model structure and input signature, never a silent
pass-through, callable targets."""
from __future__ import annotations

import pytest
import torch

import relprop
from relprop import graph
from tests.families.cases import CASES


@pytest.fixture
def export_calls(monkeypatch):
    calls = []
    original = torch.export.export

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    graph._TRACERS.clear()
    return calls


def test_one_export_for_new_images_and_batch_sizes(export_calls):
    case = CASES["vit"]
    explainer = relprop.Explainer(case.build(None))
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 3, 2, 5):
        explainer.explain(torch.randn(batch, 3, 32, 32, generator=gen), "transformer_attribution")
    explainer.explain(torch.randn(2, 3, 32, 32, generator=gen), "lrp")
    assert len(export_calls) == 1
    assert explainer.tracer.programs[0].trace_seconds > 0


def test_one_export_for_every_text_length(export_calls):
    case = CASES["bert"]
    explainer = relprop.Explainer(case.build(None))
    for length in (2, 5, 9, 17, 33):
        ids = torch.randint(5, 100, (2, length), generator=torch.Generator().manual_seed(length))
        ids[:, 0] = 2
        explainer.explain({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "transformer_attribution")
    explainer.explain({"input_ids": ids[:1]}, "rollout")
    assert len(export_calls) == 1


def test_explainers_of_one_structure_share_the_export(export_calls):
    case = CASES["vit"]
    first, second = case.build(None), case.build(None)
    x = case.inputs(2)
    relprop.Explainer(first).explain(x, "rollout")
    relprop.Explainer(second).explain(x, "rollout")
    assert len(export_calls) == 1


def test_changed_setting_is_exported_again_and_explained_as_changed(export_calls):
    case = CASES["vit"]
    model = case.build(None)
    explainer = relprop.Explainer(model, dtype=torch.float64)
    x = case.inputs(2)
    before = explainer.logits(x)
    model.vit.layernorm.eps = 0.5                  # not a tensor: seen by the structure check
    after = explainer.logits(x)
    model.eval()
    with torch.no_grad():
        expected = model.double()(pixel_values=x["pixel_values"].double()).logits
    assert len(export_calls) == 2
    assert not torch.allclose(before, after) and torch.allclose(after, expected)


def test_operation_without_rule_is_an_error_naming_it(monkeypatch):
    """No silent pass-through: an op kind missing from the rule set stops the propagation with
    the op, the module it ran in and what to do."""
    from relprop import rules

    case = CASES["vit"]
    explainer = relprop.Explainer(case.build(None))
    ops = dict(rules.PAPER.ops)
    del ops["activation"]
    monkeypatch.setattr(rules, "RULE_SETS", {**rules.RULE_SETS,
                                             "paper": rules.RuleSet("paper", rules.PAPER.linear, rules.PAPER.add, ops)})
    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"no relevance rule for aten.gelu.default .*layers.1.mlp.*'paper' rule set.*CONTRIBUTING"):
        explainer.explain(case.inputs(1), "transformer_attribution")


def test_unknown_operation_kind_is_an_error(monkeypatch):
    case = CASES["vit"]
    explainer = relprop.Explainer(case.build(None))
    monkeypatch.delitem(graph._KINDS, torch.ops.aten.gelu.default)
    graph._TRACERS.clear()
    with pytest.raises(relprop.UnsupportedModelError, match=r"no relevance rule for aten.gelu.default"):
        explainer.explain(case.inputs(1), "lrp")
    graph._TRACERS.clear()


# -- callable targets ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_callable_target_selecting_a_logit_equals_the_class_index(name):
    case = CASES[name]
    explainer = relprop.Explainer(case.build(None), dtype=torch.float64)
    inputs = case.inputs(3)
    for method in relprop.methods():
        by_index = explainer.explain(inputs, method, target=2).relevance
        by_callable = explainer.explain(inputs, method, target=lambda out: out.logits[:, 2])
        assert torch.equal(by_callable.relevance, by_index), method
        assert by_callable.target is None


def test_regression_output_explained_with_a_callable_target():
    import transformers as tf
    from tests.families.cases import TEXT_CONFIG, hf_builder, text_inputs

    config = dict(TEXT_CONFIG, num_labels=1)
    model = hf_builder(tf.BertConfig, tf.BertForSequenceClassification, **config)(None)
    explainer = relprop.Explainer(model, dtype=torch.float64)
    inputs = text_inputs()(2)
    result = explainer.explain(inputs, "transformer_attribution", target=lambda out: out.logits[:, 0])
    assert result.relevance.shape == (2, 12) and torch.isfinite(result.relevance).all()
    # relevance of the regression output is relevance of a linear readout: the sign of the score flips it
    flipped = explainer.explain(inputs, "lrp", target=lambda out: -out.logits[:, 0]).relevance
    assert torch.allclose(flipped, -explainer.explain(inputs, "lrp", target=lambda out: out.logits[:, 0]).relevance)


def test_callable_target_of_the_wrong_shape_is_refused():
    case = CASES["vit"]
    explainer = relprop.Explainer(case.build(None))
    with pytest.raises(relprop.InputError, match=r"one score per sample.*\[2\].*\(2, 5\)"):
        explainer.explain(case.inputs(2), "rollout", target=lambda out: out.logits)


@pytest.mark.parametrize("slices", ["all heads at once", "one head at a time"])
@pytest.mark.parametrize("name", ["vit", "llama_lm"])
def test_paper_method_streams_the_attention_relevance(name, slices, monkeypatch):
    """transformer_attribution reduces each block's ∇A ⊙ R_A as the propagation reaches it: no
    block's R_A is kept, and on SDPA models the forward keeps no block's A either (recomputed
    block by block, and a slice of heads at a time when A is large; ∇A from the SDPA output's
    gradient) — the long-context memory bound. The map equals the one computed from every
    block's full A, ∇A, R_A (keep_internals) in float64."""
    from relprop import engine, oprules

    kept, probabilities, head_slices = [], [], []
    propagate, forward, record = engine.propagate, engine.forward, engine.Relevance.record
    if slices != "all heads at once":
        monkeypatch.setattr(oprules, "ATTENTION_SLICE_BYTES", 1)       # the smallest slice: one group

    def recording_slices(self, site, relevance, heads=None):
        head_slices.append(heads)
        return record(self, site, relevance, heads)

    monkeypatch.setattr(engine.Relevance, "record", recording_slices)

    def recording(*args, **kwargs):
        result = propagate(*args, **kwargs)
        kept.append(len(result.attention))
        return result

    def forward_recording(*args, **kwargs):
        result = forward(*args, **kwargs)
        probabilities.append(sum(a is not None for a in result.attention))
        return result

    monkeypatch.setattr(engine, "propagate", recording)
    monkeypatch.setattr(engine, "forward", forward_recording)
    case = CASES[name]
    model = case.build(None).double()
    inputs = case.inputs(2)
    explainer = relprop.Explainer(model)
    streamed = explainer.explain(inputs, "transformer_attribution", target=case.target)
    full = explainer.explain(inputs, "transformer_attribution", target=case.target, keep_internals=True)
    assert kept[0] == 0 and kept[1] == len(full.internals.attention_relevance) > 0
    assert probabilities[0] == 0 and probabilities[1] == len(full.internals.attention)
    assert torch.allclose(streamed.relevance, full.relevance, rtol=1e-12, atol=1e-15)
    streamed_slices = head_slices[:len(head_slices) - len(full.internals.attention_relevance)]
    if slices == "all heads at once":
        assert all(heads is None for heads in streamed_slices)
    else:       # one query head at a time, also inside a key-value group (Llama: enable_gqa, 2 per group)
        total = model.config.num_attention_heads
        blocks = len(full.internals.attention_relevance)
        assert streamed_slices == [(head, head + 1, total) for head in range(total)] * blocks


def test_head_slices_respect_the_byte_budget(monkeypatch):
    """Slices of query heads tile the heads, each within the byte budget (at least one head), also
    inside a group of grouped-query attention (a group larger than the budget is split: the budget
    holds at long contexts); each slice reads one key-value head per query head."""
    from relprop import engine, oprules

    q, k = torch.zeros(2, 8, 16, 4), torch.zeros(2, 2, 16, 4)          # 4 query heads per key-value head
    per_head = 2 * 16 * 16 * 4                                          # bytes of one head's [B, N, S] float32
    monkeypatch.setattr(oprules, "ATTENTION_SLICE_BYTES", 1)
    assert oprules._head_slices(q, k) == [(h, h + 1) for h in range(8)]
    monkeypatch.setattr(oprules, "ATTENTION_SLICE_BYTES", 3 * per_head)
    assert oprules._head_slices(q, k) == [(0, 3), (3, 6), (6, 8)]
    monkeypatch.setattr(oprules, "ATTENTION_SLICE_BYTES", 8 * per_head)
    assert oprules._head_slices(q, k) == [(0, 8)]
    k = torch.arange(2.0).view(1, 2, 1, 1).expand(2, 2, 16, 4)
    assert engine.kv_heads_of(k, 3, 6, 4)[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]   # heads 3 | 4, 5
