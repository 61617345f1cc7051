"""Every method against the authors' own code on the golden ViT (float64, <= 1e-5 x max|golden|).

Run both through the Hugging Face ViT and through a timm-layout model built from the
timm-style state dict.
"""
from __future__ import annotations

import pytest
import torch

import relprop
from tests.conftest import golden_file, rel_err

TOL = 1e-5
OUT64 = golden_file("vit_small.outputs_fp64.safetensors")
OUT32 = golden_file("vit_small.outputs_fp32.safetensors")
DEBUG = golden_file("vit_small.debug_fp64.safetensors")

PER_TARGET = [  # golden key, method, options
    ("transformer_attribution_start0", "transformer_attribution", {"start_layer": 0}),
    ("transformer_attribution_start1", "transformer_attribution", {"start_layer": 1}),
    ("lrp_last_layer", "partial_lrp", {}),
    ("attn_gradcam", "attn_gradcam", {}),
    ("attn_gradcam_prenorm", "attn_gradcam", {"normalize": False}),
    ("generic_iccv21", "grad_rollout", {}),
    ("full_lrp_ours", "lrp", {"rules": "paper"}),
    ("full_lrp_plain", "lrp", {"rules": "plain"}),
]
TARGET_FREE = [
    ("rollout_start0", "rollout", {"start_layer": 0}),
    ("rollout_start1", "rollout", {"start_layer": 1}),
    ("attn_last_layer", "raw_attention", {}),
]
# float32 is reproducible only for the attention-only methods (golden README)
FP32_MEANINGFUL = {"rollout_start0", "rollout_start1", "attn_last_layer", "attn_gradcam",
                   "attn_gradcam_prenorm", "generic_iccv21"}


def cases():
    for image in range(4):
        for target in ("pred", "other"):
            for key, method, options in PER_TARGET:
                if f"img{image}/{target}/{key}" in OUT64:
                    yield pytest.param(image, target, key, method, options, id=f"img{image}-{target}-{key}")
        for key, method, options in TARGET_FREE:
            yield pytest.param(image, None, key, method, options, id=f"img{image}-{key}")


def _golden_key(image, target, key):
    return f"img{image}/{key}" if target is None else f"img{image}/{target}/{key}"


def _check(explainer, vit_inputs, image, target, key, method, options, expected, tol):
    x = vit_inputs["pixel_values"][image:image + 1]
    target_class = None if target is None else int(vit_inputs[f"target_{target}"][image])
    result = explainer.explain(x, method, target=target_class, **options)
    assert rel_err(result.relevance, expected) <= tol


@pytest.fixture(scope="module")
def hf64(vit_model):
    return relprop.Explainer(vit_model, dtype=torch.float64)


@pytest.fixture(scope="module")
def timm64(timm_style_vit):
    return relprop.Explainer(timm_style_vit, dtype=torch.float64)


@pytest.mark.parametrize("image,target,key,method,options", list(cases()))
def test_hf_vit_matches_reference_fp64(hf64, vit_inputs, image, target, key, method, options):
    _check(hf64, vit_inputs, image, target, key, method, options, OUT64[_golden_key(image, target, key)], TOL)


@pytest.mark.parametrize("image,target,key,method,options", list(cases()))
def test_timm_layout_vit_matches_reference_fp64(timm64, vit_inputs, image, target, key, method, options):
    _check(timm64, vit_inputs, image, target, key, method, options, OUT64[_golden_key(image, target, key)], TOL)


@pytest.mark.parametrize("image,target,key,method,options",
                         [c for c in cases() if c.values[2] in FP32_MEANINGFUL])
def test_hf_vit_matches_reference_fp32(vit_model, vit_inputs, image, target, key, method, options):
    explainer = relprop.Explainer(vit_model)
    _check(explainer, vit_inputs, image, target, key, method, options,
           OUT32[_golden_key(image, target, key)], 1e-4)


def test_logits_match_reference(hf64, vit_inputs):
    for image in range(4):
        logits = hf64.logits(vit_inputs["pixel_values"][image:image + 1])
        assert rel_err(logits, OUT64[f"img{image}/logits"]) <= 1e-12


@pytest.mark.parametrize("target", ["pred"])
def test_per_block_internals_match_debug(hf64, vit_inputs, target):
    rows = DEBUG["debug/rows"]
    x = vit_inputs["pixel_values"][:1]
    t = int(vit_inputs[f"target_{target}"][0])
    ours = hf64.explain(x, "transformer_attribution", target=t, keep_internals=True).internals
    plain = hf64.explain(x, "lrp", target=t, rules="plain", keep_internals=True).internals
    attention = torch.stack([a[0][:, rows] for a in ours.attention])
    grad = torch.stack([ours.attention_grad[i][0][:, rows] for i in range(4)])
    rel_ours = torch.stack([ours.attention_relevance[i][0][:, rows] for i in range(4)])
    rel_plain = torch.stack([plain.attention_relevance[i][0][:, rows] for i in range(4)])
    assert rel_err(attention, DEBUG["debug/A"]) <= TOL
    assert rel_err(grad, DEBUG[f"debug/{target}/dA"]) <= TOL
    assert rel_err(rel_ours, DEBUG[f"debug/{target}/R_A_ours"]) <= TOL
    assert rel_err(rel_plain, DEBUG[f"debug/{target}/R_A_plain"]) <= TOL
