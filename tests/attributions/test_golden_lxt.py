"""AttnLRP and CP-LRP against LXT 2.1, the AttnLRP authors' library (`data/golden/lxt/README.md`).

The folders are loaded with the current transformers as a user would; relprop explains them
through the model's exported graph. Float64; the goldens' tolerance: 1e-5 x max|golden| per
sample; padded positions exactly 0. And an independent oracle for images: a copy of a ViT
patched LXT-style (the rules written as forward replacements) gives the same token relevance.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import relprop
from tests.conftest import GOLDEN

LXT = GOLDEN / "lxt"
CASES = [("llama_small", "attnlrp"), ("llama_small", "cp_lrp"), ("qwen2_small", "attnlrp"),
         ("qwen2_small", "cp_lrp"), ("gpt2_small", "attnlrp"), ("gpt2_small", "cp_lrp"), ("bert_small", "attnlrp")]
_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        folder = LXT / name
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
        _MODELS[name] = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float64).eval()
    return _MODELS[name]


def _golden(name: str, mode: str) -> dict[str, torch.Tensor]:
    return load_file(LXT / f"{name}.{mode}.safetensors")


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_matches_lxt(name, mode):
    golden = _golden(name, mode)
    explainer = relprop.Explainer(_model(name))
    inputs = {"input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]}
    result = explainer.explain(inputs, mode)
    assert torch.equal(result.target, golden["target"])           # the default target is LXT's
    # relprop computes in float64 what the model computes in float32 (Llama's and Qwen2's RMSNorm
    # and rotary tables): logits agree to float32 rounding
    assert (result.logits - golden["logits"]).abs().max() <= 1e-6 * golden["logits"].abs().max()
    for sample in range(len(golden["relevance"])):
        reference = golden["relevance"][sample]
        error = (result.relevance[sample] - reference).abs().max()
        assert error <= 1e-5 * reference.abs().max(), (sample, float(error))
    padded = golden["attention_mask"] == 0
    assert padded.any() == (name == "bert_small")
    assert (result.relevance[padded] == 0).all()


def test_cp_lrp_conserves_the_logit_without_biases():
    """CP-LRP on the bias-free Llama: the tokens' relevances sum to the explained logit."""
    golden = _golden("llama_small", "cp_lrp")
    explainer = relprop.Explainer(_model("llama_small"))
    result = explainer.explain({"input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]},
                               "cp_lrp")
    logit = result.logits.gather(1, result.target[:, None]).squeeze(1)
    assert (result.relevance.sum(1) - logit).abs().max() <= 1e-10 * logit.abs().max()


def test_redistributed_biases_conserve_on_qwen2():
    """Qwen2's query/key/value projections have biases, which absorb relevance in LXT (the
    default); ``biases="redistribute"`` hands their share back to the inputs, so CP-LRP (where
    the value bias is the only absorber) then conserves the logit."""
    golden = _golden("qwen2_small", "cp_lrp")
    explainer = relprop.Explainer(_model("qwen2_small"))
    inputs = {"input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]}
    absorbed = explainer.explain(inputs, "cp_lrp")
    redistributed = explainer.explain(inputs, "cp_lrp", biases="redistribute")
    logit = absorbed.logits.gather(1, absorbed.target[:, None]).squeeze(1)
    assert (absorbed.relevance.sum(1) - logit).abs().max() > 1e-3 * logit.abs().max()
    assert (redistributed.relevance.sum(1) - logit).abs().max() <= 1e-10 * logit.abs().max()
    with pytest.raises(relprop.errors.OptionError, match="biases"):
        explainer.explain(inputs, "cp_lrp", biases="keep")


# -- an independent oracle for images: LXT's rules as forward replacements on a ViT copy -------
class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(y / (x + 1e-10))
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None


def _lxt_style_vit_relevance(model, pixels, target, mode, monkeypatch):
    from transformers.models.vit import modeling_vit

    original_attention = modeling_vit.eager_attention_forward

    def attention(module, query, key, value, *args, **kwargs):
        if mode == "attnlrp":
            query, key, value = _Scale.apply(query, 0.25), _Scale.apply(key, 0.25), _Scale.apply(value, 0.5)
        else:
            query, key = query.detach(), key.detach()
        return original_attention(module, query, key, value, *args, **kwargs)

    def layer_norm(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt().detach() * self.weight + self.bias

    def gelu(self, x):
        return _Identity.apply(x, torch.nn.functional.gelu(x))

    monkeypatch.setattr(modeling_vit, "eager_attention_forward", attention)
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", layer_norm)
    monkeypatch.setattr(type(model.vit.layers[0].mlp.activation_fn), "forward", gelu)
    captured = {}
    projection = model.vit.embeddings.patch_embeddings.projection
    handle = projection.register_forward_hook(lambda m, i, out: captured.setdefault("patches", out))
    try:
        logits = model(pixel_values=pixels).logits
        patches = captured["patches"]
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), patches)
    finally:
        handle.remove()
    return (patches * grad).sum(1).flatten(1).detach()


@pytest.mark.parametrize("mode", ["attnlrp", "cp_lrp"])
def test_vit_matches_lxt_style_patching(mode, monkeypatch):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    config._attn_implementation = "eager"
    model = transformers.ViTForImageClassification(config).double().eval()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    result = relprop.Explainer(model).explain(pixels, mode)        # before patching: the model as it is
    oracle = _lxt_style_vit_relevance(model, pixels, result.target, mode, monkeypatch)
    assert result.relevance.shape == (2, 16)
    # the eager ViT computes its softmax in float32 even in float64; relprop computes all in float64
    assert (result.relevance - oracle).abs().max() <= 1e-6 * oracle.abs().max()

