"""Long contexts: what an explanation keeps for its backward pass. The one-backward-pass methods
(AttnLRP, CP-LRP) keep no more than the model's own input gradient does (LXT's property), and
the graph rewrites that make it so (grouped-query attention folded into SDPA, one shared mask)
change no map."""
from __future__ import annotations

import pytest
import torch

import relprop
from relprop import engine, graph
from tests.families.cases import CASES

GQA_CASES = ["llama_lm", "qwen2_classifier", "mistral_lm"]


def _explain_all(model, inputs, target):
    explainer = relprop.Explainer(model)
    return {method: explainer.explain(inputs, method, target=target).relevance for method in relprop.methods()}


@pytest.mark.parametrize("name", GQA_CASES)
def test_folding_repeated_heads_changes_no_map(name, monkeypatch):
    """``repeat_kv`` + SDPA becomes one SDPA call with ``enable_gqa``: every method's map, on
    right- and left-padded batches, equals the one of the graph as exported (float64)."""
    case = CASES[name]
    model = case.build(None).double()
    target = case.target
    batches = [case.inputs(2), case.left_inputs(2)]
    graph._TRACERS.clear()
    folded = [_explain_all(model, inputs, target) for inputs in batches]
    program = relprop.Explainer(model).tracer.programs[0]
    sdpa = [s for s in program.steps if s.kind == "attention"]
    assert sdpa and all(s.kwargs.get("enable_gqa") for s in sdpa)
    monkeypatch.setattr(graph, "_fold_repeated_heads", lambda steps, shapes: None)
    graph._TRACERS.clear()
    unfolded = [_explain_all(model, inputs, target) for inputs in batches]
    graph._TRACERS.clear()
    for ours, exported in zip(folded, unfolded):
        for method, relevance in ours.items():
            assert torch.allclose(relevance, exported[method], rtol=1e-10, atol=1e-13), method


@pytest.mark.parametrize("mask_kind", ["causal", "causal, left-padded", "full", "full, right-padded"])
def test_lean_mask_gives_the_same_attention(mask_kind):
    """A boolean mask is converted once (shared by every block); one that keeps everything is
    dropped and an exactly causal one becomes ``is_causal``: SDPA's output is the one it gives for
    the boolean mask itself."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    if mask_kind.startswith("causal"):
        mask = mask.tril()
    if mask_kind == "causal, left-padded":
        mask[1, :, :, :3] = False                  # sample 1 left-padded by 3 tokens
        mask[1, :, :3, 0] = True                   # (padded rows attend to something, as transformers does)
    if mask_kind == "full, right-padded":
        mask[1, :, :, 6:] = False
    args, kwargs = engine.lean_sdpa_arguments([q, k, v, mask], {})
    again, _ = engine.lean_sdpa_arguments([q, k, v, mask], {})
    if "padded" in mask_kind:
        assert args[3].dtype == torch.float64 and again[3] is args[3]
    else:
        assert args[3] is None and kwargs.get("is_causal", False) is (mask_kind == "causal")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(torch.nn.functional.scaled_dot_product_attention(*args, **kwargs), expected,
                          rtol=0, atol=1e-14)


def _saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct floating-point tensors autograd saves for the backward pass during
    ``run`` (each storage held until the end, so that no address is reused and a storage is counted
    once); integer indices (which position, which class: a few bytes per sample) are not counted."""
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.is_floating_point() and storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storage.nbytes() for storage in saved.values())


@pytest.mark.parametrize("name", ["llama_lm", "gpt2_lm", "bert"])
@pytest.mark.parametrize("padded", [False, True])
def test_one_pass_methods_keep_no_more_than_the_input_gradient(name, padded):
    """AttnLRP and CP-LRP keep at most what the model's own gradient at its input embeddings
    keeps (parameters frozen, as LXT runs it): no activation's input beside its identity-rule
    ratio, no repeated key-value heads, no copy of the mask per block."""
    case = CASES[name]
    model = case.build(None).eval()
    batch = (case.left_inputs or case.inputs)(2)
    inputs = {k: v.repeat(1, 3) for k, v in batch.items()}     # 36 tokens
    if not padded:
        inputs = {k: v[:1] for k, v in inputs.items()}
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    explainer = relprop.Explainer(model)
    explainer.explain(inputs, "attnlrp")                                   # the export is not the call's
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        def input_gradient():
            embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
            logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
            logits = logits[:, -1] if logits.dim() == 3 else logits            # a causal LM's next token
            logits.max(-1).values.sum().backward()
        plain = _saved_bytes(input_gradient, weights)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    for method in ("attnlrp", "cp_lrp"):
        ours = _saved_bytes(lambda: explainer.explain(inputs, method), weights)
        assert ours <= plain, (method, ours, plain)
