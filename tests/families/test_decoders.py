"""What decoder language models add on top of the contract (`test_contract.py`): the explained
position is each sample's last real token (left and right padding), a causal LM's target is a
token id (or a callable), classification heads read the last non-padding token, positions are
numbered from each sample's first real token, and the graph facts the rules rely on (rotary
cos/sin are not data, grouped-query attention comes out per query head)."""
from __future__ import annotations

import pytest
import torch

import relprop
from relprop.errors import InputError
from tests.families.cases import CASES


def _last(mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor([int(row.nonzero().max()) for row in mask])


def _generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position_ids generate() passes: real tokens numbered from 0, padding 1."""
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)


def _own_logits(model, inputs, at_last=True):
    """The model's own scores, called as generate() calls it; a causal LM's at each last real token."""
    model.eval()
    with torch.no_grad():
        logits = model(**inputs, position_ids=_generate_positions(inputs["attention_mask"])).logits
    if at_last:
        logits = logits[torch.arange(len(logits)), _last(inputs["attention_mask"])]
    return logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["gpt2_lm", "llama_lm"])
def test_causal_lm_explains_the_next_token_at_the_last_real_token(name, side):
    """Default target: each sample's most likely next token after its last real token;
    Explanation.logits: the next-token logits there; a token id, B ids, a tensor of ids and a
    callable target give the same explanation."""
    case = CASES[name]
    model = case.build(None)
    inputs = case.inputs(3) if side == "right" else case.left_inputs(3)
    expected = _own_logits(model, inputs)
    explainer = relprop.Explainer(model)
    result = explainer.explain(inputs, "rollout")
    assert result.logits.shape == (3, 100)
    assert torch.allclose(result.logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert torch.equal(result.target, expected.argmax(1))
    tokens = [7, 8, 9]
    ids = explainer.explain(inputs, "transformer_attribution", target=tokens).relevance
    assert torch.equal(explainer.explain(inputs, "transformer_attribution", target=torch.tensor(tokens)).relevance, ids)
    last = _last(inputs["attention_mask"])
    by_callable = explainer.explain(inputs, "transformer_attribution",
                                    target=lambda out: out.logits[torch.arange(3), last, torch.tensor(tokens)])
    assert torch.allclose(by_callable.relevance, ids, rtol=1e-6, atol=1e-9)
    same = explainer.explain(inputs, "lrp", target=7).relevance
    assert torch.equal(same, explainer.explain(inputs, "lrp", target=[7, 7, 7]).relevance)
    assert (same[inputs["attention_mask"] == 0] == 0).all()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["gpt2_classifier", "llama_classifier", "gemma3_classifier"])
def test_classifier_heads_read_the_last_real_token(name, side):
    """A sequence-classification head pools the last non-padding token itself: its logits are
    relprop's with either padding, and the methods' pooled row is that token's."""
    case = CASES[name]
    model = case.build("eager")
    inputs = case.inputs(3) if side == "right" else case.left_inputs(3)
    expected = _own_logits(model, inputs, at_last=False)
    result = relprop.Explainer(model, dtype=torch.float64).explain(inputs, "raw_attention", keep_internals=True)
    assert torch.allclose(result.logits.float(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    with torch.no_grad():
        attentions = model(**inputs, position_ids=_generate_positions(inputs["attention_mask"]),
                           output_attentions=True).attentions
    row = attentions[-1][torch.arange(3), :, _last(inputs["attention_mask"])].mean(1)        # [B, N]
    row = row.masked_fill(inputs["attention_mask"] == 0, 0)
    assert torch.allclose(result.relevance.float(), row, atol=1e-6)


def test_left_padding_keeps_positions_and_given_positions_are_used():
    """GPT-2 (absolute positions): a left-padded sample's next-token logits are its logits alone
    (positions counted from its first real token); position_ids given by the user are used as given."""
    case = CASES["gpt2_lm"]
    model = case.build(None)
    explainer = relprop.Explainer(model)
    inputs = case.left_inputs(3)
    real = inputs["attention_mask"][1].bool()
    alone = explainer.logits({"input_ids": inputs["input_ids"][1:2, real]})
    assert torch.allclose(explainer.logits(inputs)[1], alone[0], rtol=1e-5, atol=1e-5)
    shifted = dict(inputs, position_ids=torch.arange(12).expand(3, 12))       # what model(**inputs) uses
    model.eval()
    with torch.no_grad():
        own = model(**inputs).logits[:, -1]
    assert torch.allclose(explainer.logits(shifted), own, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(explainer.logits(shifted)[1], alone[0], rtol=1e-3, atol=1e-3)


def test_decoder_inputs_checks():
    """Left padding is accepted for decoders (not for [CLS] readers); a sample with no real token is refused."""
    explainer = relprop.Explainer(CASES["llama_lm"].build(None))
    inputs = CASES["llama_lm"].inputs(2)
    empty = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    empty["attention_mask"][1] = 0
    with pytest.raises(InputError, match=r"sample\(s\) \[1\] have no real token"):
        explainer.explain(empty, "rollout")
    bert = relprop.Explainer(CASES["bert"].build(None))
    with pytest.raises(InputError, match="first token"):
        bert.explain(CASES["llama_lm"].left_inputs(3), "rollout", target=0)


def test_rotary_positions_are_not_data_and_gqa_attention_is_per_query_head():
    """Llama: cos/sin come from positions (never data: relevance does not flow into them);
    with 4 query and 2 key-value heads, A is [B, 4, N, N]; Gemma's soft-capping is an activation."""
    explainer = relprop.Explainer(CASES["llama_lm"].build(None))
    inputs = CASES["llama_lm"].inputs(2)
    program, _ = explainer.program(inputs)
    trig = [s for s in program.steps if s.target in (torch.ops.aten.cos.default, torch.ops.aten.sin.default)]
    assert trig and not any(s.data for s in trig)
    internals = explainer.explain(inputs, "rollout", keep_internals=True).internals
    assert [tuple(a.shape) for a in internals.attention] == [(2, 4, 12, 12)] * 2
    gemma, _ = relprop.Explainer(CASES["gemma2_lm"].build(None)).program(inputs)
    tanh = [s for s in gemma.steps if s.target is torch.ops.aten.tanh.default]
    assert len(tanh) == 3 and all(s.kind == "activation" and s.data for s in tanh)     # 2 blocks + logits
    # the mask added to the soft-capped scores is not part of the activation (its share would blow up
    # the activation's output/input ratio): it is the mask before each eager softmax
    masks = [s for s in gemma.steps if s.kind == "mask"]
    assert len(masks) == 2 and all(s.target is torch.ops.aten.add.Tensor for s in masks)
