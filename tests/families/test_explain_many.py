"""`Explainer.explain_many` (several methods sharing passes) gives each method's `explain` map, on
a text encoder (padding), a decoder (SDPA) and Swin (windows, merged grids); tests/serve checks
the bundled ViT. All 40 families passed once (273 s on a loaded 2-core machine); the suite keeps
these three."""
from __future__ import annotations

import pytest
import torch

import relprop
from relprop.errors import OptionError, UnknownMethodError
from tests.families.cases import CASES


KINDS = ("bert", "llama_lm", "swin")


@pytest.mark.parametrize("name", KINDS)
def test_explain_many_equals_explain(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build(None)
    inputs = case.inputs(3)
    target = case.target if case.target is not None else [i % case.classes for i in range(3)]
    explainer = relprop.Explainer(model)
    methods = relprop.methods()
    many = explainer.explain_many(inputs, methods + ["rollout"], target=target,
                                  options={"rollout": {"start_layer": 1}})
    assert list(many) == methods                                     # in the order given, each once
    for method in methods:
        options = {"start_layer": 1} if method == "rollout" else {}
        alone = explainer.explain(inputs, method, target=target, **options)
        together = many[method]
        assert together.method == method and together.options == alone.options
        torch.testing.assert_close(together.relevance, alone.relevance, msg=f"{name} {method}")
        assert together.grid == alone.grid and together.input_size == alone.input_size
        if alone.target is not None:
            assert torch.equal(together.target, alone.target)
        if alone.logits is not None:
            torch.testing.assert_close(together.logits, alone.logits)


def test_explain_many_refuses_what_explain_refuses():
    case = CASES["vit"]
    explainer = relprop.Explainer(case.build(None))
    inputs = case.inputs(1)
    with pytest.raises(UnknownMethodError):
        explainer.explain_many(inputs, ["rollout", "nope"])
    with pytest.raises(OptionError):
        explainer.explain_many(inputs, ["rollout"], options={"rollout": {"nope": 1}})
    with pytest.raises(OptionError):
        explainer.explain_many(inputs, ["rollout"], options={"lrp": {}})
