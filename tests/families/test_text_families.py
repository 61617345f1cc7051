"""The op rules the text families beyond BERT need (rotary embeddings, DeBERTa's masked_fill,
in-place sums and relative-position products), checked on tiny graphs against the rule's
formula; and what these families add on top of the contract (`test_contract.py`): ALBERT's
shared layer explained per call, ModernBERT's mean-pooled row, token relevance from `lrp`."""
from __future__ import annotations

import pytest
import torch

import relprop
from relprop import engine
from relprop.graph import build_program, export_model
from relprop.rules import PLAIN, PRESETS
from tests.families.cases import CASES


def _input_relevance(module, inputs: dict, relevance: torch.Tensor) -> dict:
    """Relevance at each input of ``module`` (float64, plain rules) from ``relevance`` at its output."""
    program = build_program(export_model(module, inputs, {}), list(inputs))
    weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    fwd = engine.forward(program, inputs, weights, torch.float64, keep=frozenset(range(len(program.steps))))
    at = {name: index for index, what, name in program.inputs if what == "input"}
    result = engine.propagate(fwd, {program.outputs[0]: relevance}, PLAIN, PRESETS["text"], lowest_site=None,
                              collect=frozenset(at.values()))
    return {name: result.at.get(index) for name, index in at.items()}


class Rotary(torch.nn.Module):
    """x * cos + rotate_half(x) * sin, cos/sin from positions (as Llama / ModernBERT)."""

    def __init__(self, length=5, dim=8):
        super().__init__()
        angles = torch.arange(length, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(dim // 2)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + rotated * self.sin


def test_rotary_embedding_gets_the_z_rule_of_its_linear_map():
    """cos/sin are not data: x*cos and rotate_half(x)*sin pass relevance unchanged, the sum
    splits it by contribution; together exactly the z-rule of the linear map y = J x."""
    torch.manual_seed(0)
    module = Rotary()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    relevance = torch.randn(1, 5, 8, dtype=torch.float64)
    ours = _input_relevance(module, {"x": x}, relevance)["x"]
    jacobian = torch.autograd.functional.jacobian(module, x).reshape(40, 40)     # y_i = sum_j J_ij x_j
    flat_x, flat_y = x.reshape(40), module(x).reshape(40)
    expected = flat_x * ((relevance.reshape(40) / flat_y) @ jacobian)
    # to the rules' 1e-9 stabiliser of denominators
    assert torch.allclose(ours.reshape(40), expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    assert torch.allclose(ours.sum(), relevance.sum(), rtol=1e-6)               # conserved


class MaskedScores(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("masked", torch.tensor([[False, True, False, True]]))

    def forward(self, x):
        return x.masked_fill(self.masked, torch.finfo(x.dtype).min) * 1.0


def test_masked_fill_passes_kept_entries_and_drops_filled_ones():
    x = torch.randn(3, 4, dtype=torch.float64)
    relevance = torch.randn(3, 4, dtype=torch.float64)
    ours = _input_relevance(MaskedScores(), {"x": x}, relevance)["x"]
    assert torch.equal(ours, relevance.masked_fill(MaskedScores().masked, 0))


class InPlaceSum(torch.nn.Module):
    def forward(self, x, y):
        total = x * 1.5
        total += y                  # DeBERTa's ``score += p2c / scale``
        return total * 1.0


class InPlaceOnViewed(torch.nn.Module):
    def forward(self, x, y):
        total = x * 1.5
        flat = total.view(-1)       # a view taken before the in-place sum sees it
        total += y
        return flat * 1.0


def test_in_place_sum_is_split_by_the_values_before_the_sum():
    x, y = torch.rand(2, 3, dtype=torch.float64) + 1, torch.rand(2, 3, dtype=torch.float64) + 1
    relevance = torch.rand(2, 3, dtype=torch.float64)
    ours = _input_relevance(InPlaceSum(), {"x": x, "y": y}, relevance)
    total = 1.5 * x + y
    assert torch.allclose(ours["x"], 1.5 * x / total * relevance, rtol=1e-12)
    assert torch.allclose(ours["y"], y / total * relevance, rtol=1e-12)


def test_in_place_op_on_a_value_seen_elsewhere_is_refused():
    x, y = torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(relprop.UnsupportedModelError, match="in-place .* read elsewhere"):
        build_program(export_model(InPlaceOnViewed(), {"x": x, "y": y}, {}), ["x", "y"])


class RelativePositionTerm(torch.nn.Module):
    """DeBERTa's content-to-position scores: bmm(q, P_kᵀ) with P_k from position embeddings
    (no token dependence), then a gather by relative distance."""

    def __init__(self, positions=7, dim=4):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(positions, dim, dtype=torch.float64))
        distance = torch.arange(4)[None, :] - torch.arange(4)[:, None] + 3
        self.register_buffer("index", distance)

    def forward(self, q):
        keys = self.table.unsqueeze(0).repeat(q.shape[0], 1, 1)
        scores = torch.bmm(q, keys.transpose(-1, -2))                    # [B, 4, 7]
        return torch.gather(scores, -1, self.index.expand(q.shape[0], 4, 4))


def test_relative_position_term_goes_to_the_query_by_the_linear_rule():
    """The position factor P_k acts as a weight: the term's whole relevance goes to q (linear
    rule of the rule set, P_k the weight); the gather routes each score back to its entry."""
    torch.manual_seed(0)
    module = RelativePositionTerm()
    q = torch.randn(2, 4, 4, dtype=torch.float64)
    relevance = torch.randn(2, 4, 4, dtype=torch.float64)
    ours = _input_relevance(module, {"q": q}, relevance)["q"]
    full = torch.zeros(2, 4, 7, dtype=torch.float64).scatter_add_(-1, module.index.expand(2, 4, 4), relevance)
    expected = PLAIN.linear(q, module.table.detach(), full)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())


def test_albert_shared_layer_is_one_attention_site_per_call():
    case = CASES["albert"]
    model = case.build("eager").eval()
    inputs = case.inputs(2)
    internals = relprop.Explainer(model).explain(inputs, "rollout", keep_internals=True).internals
    out = model(**inputs, output_attentions=True)
    assert model.config.num_hidden_groups == 1 and len(out.attentions) == model.config.num_hidden_layers == 2
    assert len(internals.attention) == 2
    assert not torch.allclose(internals.attention[0], internals.attention[1])   # two calls, two inputs


def test_modernbert_mean_pooling_reports_the_mean_of_the_rows():
    """classifier_pooling="mean": the pooled row is the mean over the valid tokens' rows (raw
    attention: of the last A; rollout: of the row-normalised product); "cls": row 0."""
    inputs = CASES["modernbert_mean"].inputs(3)
    valid = inputs["attention_mask"].bool()
    weights = valid.double() / valid.sum(1, keepdim=True)
    for pooling in ("mean", "cls"):
        explainer = relprop.Explainer(CASES[f"modernbert_{pooling}"].build(None), dtype=torch.float64)
        raw = explainer.explain(inputs, "raw_attention", target=0, keep_internals=True)
        rollout = explainer.explain(inputs, "rollout", target=0).relevance
        attention = [a.mean(1) for a in raw.internals.attention]
        product = torch.eye(12, dtype=torch.float64).expand(3, 12, 12)
        for a in reversed(attention):                 # the pooled row of N_L ... N_1
            matrix = a + torch.eye(12, dtype=torch.float64)
            product = product @ (matrix / matrix.sum(-1, keepdim=True))
        row = weights if pooling == "mean" else torch.eye(12, dtype=torch.float64)[0].expand(3, 12)
        expected_raw = (row[:, :, None] * attention[-1]).sum(1)
        expected_rollout = (row[:, :, None] * product).sum(1)
        assert torch.allclose(raw.relevance, expected_raw.masked_fill(~valid, 0), atol=1e-12), pooling
        assert torch.allclose(rollout, expected_rollout.masked_fill(~valid, 0), atol=1e-12), pooling


@pytest.mark.parametrize("name", ["electra", "albert", "modernbert_mean", "deberta_v2"])
def test_lrp_gives_token_relevance_at_the_embeddings_output(name):
    """`lrp` reports the relevance at the embeddings module's output summed over features:
    one number per token, nonzero on real tokens, 0 on padding."""
    case = CASES[name]
    inputs = case.inputs(3)
    explainer = relprop.Explainer(case.build(None), dtype=torch.float64)
    program, _ = explainer.program(inputs)
    point = program.steps[explainer._input_point(program)]
    assert ".embeddings" in point.module or point.module.startswith("embeddings")
    result = explainer.explain(inputs, "lrp", target=[0, 1, 2]).relevance
    valid = inputs["attention_mask"].bool()
    assert result.shape == (3, 12) and torch.isfinite(result).all()
    assert (result[~valid] == 0).all() and (result[valid] != 0).all()

