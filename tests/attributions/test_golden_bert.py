"""Every method against the authors' own code on the golden BERT (float64, <= 1e-5 x max|golden|).

The reference overwrites the [CLS] position after computing (with the row minimum for the
paper's method, with 0 for the baselines); relprop returns the value before that overwrite,
so [CLS] is compared separately where the reference kept it (grad_rollout) and skipped
where it overwrote it. Padded positions must be exactly 0.
"""
from __future__ import annotations

import pytest
import torch

import relprop
from tests.conftest import golden_file, rel_err

TOL = 1e-5
OUT64 = golden_file("bert_small.outputs_fp64.safetensors")
UNPADDED = golden_file("bert_small.outputs_fp64_unpadded.safetensors")
DEBUG = golden_file("bert_small.debug_fp64.safetensors")

PER_TARGET = [  # golden key, method, options, [CLS] overwritten by the reference
    ("generate_LRP_start0", "transformer_attribution", {"start_layer": 0}, True),
    ("generate_LRP_start3", "transformer_attribution", {"start_layer": 3}, True),
    ("generate_LRP_start3", "transformer_attribution", {}, True),          # default: last layer
    ("generate_LRP_last_layer", "partial_lrp", {}, True),
    ("generate_LRP_last_layer_ours", "partial_lrp", {"rules": "paper"}, True),
    ("generate_full_lrp", "lrp", {}, True),
    ("generate_full_lrp_ours", "lrp", {"rules": "paper"}, True),
    ("generate_attn_gradcam", "attn_gradcam", {}, True),
    ("generic_iccv21", "grad_rollout", {}, False),
]
TARGET_FREE = [
    ("generate_attn_last_layer", "raw_attention", {}),
    ("generate_rollout", "rollout", {}),
]


def cases():
    for seq in range(3):
        for target in ("pred", "other"):
            for key, method, options, overwritten in PER_TARGET:
                yield pytest.param(seq, target, key, method, options, overwritten,
                                   id=f"seq{seq}-{target}-{method}-{key}-{sorted(options.items())}")
        for key, method, options in TARGET_FREE:
            yield pytest.param(seq, None, key, method, options, True, id=f"seq{seq}-{key}")


@pytest.fixture(scope="module")
def explainer(bert_model):
    return relprop.Explainer(bert_model, dtype=torch.float64)


def _inputs(bert_inputs, seq):
    return {"input_ids": bert_inputs["input_ids"][seq:seq + 1],
            "attention_mask": bert_inputs["attention_mask"][seq:seq + 1]}


def _expected(seq, target, key):
    if key == "generate_attn_gradcam" and seq == 2:
        # the reference's GradCAM depends on padding; compare with its padding-free run
        return UNPADDED[f"seq2/{target}/generate_attn_gradcam_unpadded"].flatten()
    return OUT64[f"seq{seq}/{key}" if target is None else f"seq{seq}/{target}/{key}"].flatten()


@pytest.mark.parametrize("seq,target,key,method,options,overwritten", list(cases()))
def test_bert_matches_reference_fp64(explainer, bert_inputs, seq, target, key, method, options, overwritten):
    inputs = _inputs(bert_inputs, seq)
    length = int(inputs["attention_mask"].sum())
    target_class = None if target is None else int(bert_inputs[f"target_{target}"][seq])
    result = explainer.explain(inputs, method, target=target_class, **options)
    ours, expected = result.relevance.flatten(), _expected(seq, target, key)
    first = 1 if overwritten else 0
    assert rel_err(ours[first:length], expected[first:length]) <= TOL
    assert torch.all(ours[length:] == 0)
    assert result.relevance.shape == inputs["input_ids"].shape


def test_cls_value_is_the_pre_overwrite_value(explainer, bert_inputs):
    """[CLS] of the paper's method = the rollout's own [CLS, CLS] entry, not the row minimum."""
    result = explainer.explain(_inputs(bert_inputs, 0), "transformer_attribution", start_layer=0)
    expected = OUT64["seq0/pred/generate_LRP_start0"].flatten()
    assert result.relevance[0, 0] > expected[1:].max()
    assert expected[0] == pytest.approx(expected[1:].min())


def test_logits_match_reference(explainer, bert_inputs):
    for seq in range(3):
        logits = explainer.logits(_inputs(bert_inputs, seq))
        assert rel_err(logits, OUT64[f"seq{seq}/logits"]) <= 1e-12


def test_per_layer_internals_match_debug(explainer, bert_inputs):
    inputs, target = _inputs(bert_inputs, 2), int(bert_inputs["target_pred"][2])
    ours = explainer.explain(inputs, "transformer_attribution", target=target, start_layer=0, keep_internals=True)
    plain = explainer.explain(inputs, "lrp", target=target, keep_internals=True)
    layers = range(4)
    assert rel_err(torch.stack([ours.internals.attention[i][0] for i in layers]), DEBUG["debug/seq2/A"]) <= TOL
    assert rel_err(torch.stack([ours.internals.attention_grad[i][0] for i in layers]),
                   DEBUG["debug/seq2/pred/dA"]) <= TOL
    assert rel_err(torch.stack([ours.internals.attention_relevance[i][0] for i in layers]),
                   DEBUG["debug/seq2/pred/R_A_ours"]) <= TOL
    assert rel_err(torch.stack([plain.internals.attention_relevance[i][0] for i in layers]),
                   DEBUG["debug/seq2/pred/R_A_plain"]) <= TOL
