"""The LRP rules on small tensors: the reference's formulas, conservation, per-sample sums."""
from __future__ import annotations

import pytest
import torch

from relprop import rules

gen = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def reference_safe_divide(a, b):  # the reference's formula, verbatim in meaning
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def test_safe_divide_matches_reference_bit_for_bit():
    b = torch.tensor([0.0, -1e-9, 1e-9, 2e-9, -5.0, 3.0, 1e-12, -1e-12], dtype=torch.float64)
    a = torch.arange(1.0, 9.0, dtype=torch.float64)
    assert torch.equal(rules.safe_divide(a, b), reference_safe_divide(a, b))
    x, y = randn(50, 50), randn(50, 50)
    assert torch.equal(rules.safe_divide(x, y), reference_safe_divide(x, y))


def test_zplus_shared_equals_direct_formula_and_conserves():
    x, w, r = randn(3, 5, 7), randn(4, 7), randn(3, 5, 4)
    out = rules.ZPlusSharedRule()(x, w, r)
    px, nx, pw, nw = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    s = reference_safe_divide(r, px @ pw.T + nx @ nw.T)
    assert torch.allclose(out, px * (s @ pw) + nx * (s @ nw), rtol=1e-12, atol=1e-12)
    # conservation, up to the stabiliser: each denominator gets +1e-9
    assert torch.allclose(out.sum((1, 2)), r.sum((1, 2)), rtol=1e-7)
    assert torch.allclose(rules.ZPlusSharedRule()(x, w, r, x @ w.T), out)


def test_zplus_separate_is_plain_lrp():
    x, w, r = randn(2, 6), randn(3, 6), randn(2, 3)
    px, nx, pw, nw = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    expected = px * (reference_safe_divide(r, px @ pw.T) @ pw) + nx * (reference_safe_divide(r, nx @ nw.T) @ nw)
    assert torch.allclose(rules.ZPlusSeparateRule()(x, w, r), expected)


def test_normalized_add_shares_by_absolute_sums_per_sample():
    a, b, r = randn(2, 4, 3), randn(2, 4, 3), randn(2, 4, 3)
    ra, rb = rules.NormalizedAddRule()(a, b, r)
    pa, pb = rules.AddRule()(a, b, r)
    for i in range(2):
        total, sa, sb = r[i].sum(), pa[i].sum(), pb[i].sum()
        assert torch.allclose(ra[i].sum(), sa.abs() / (sa.abs() + sb.abs()) * total)
        assert torch.allclose(rb[i].sum(), sb.abs() / (sa.abs() + sb.abs()) * total)
        # sample i alone gives the same (the reference sums over the whole batch)
        ra_i, _ = rules.NormalizedAddRule()(a[i:i + 1], b[i:i + 1], r[i:i + 1])
        assert torch.allclose(ra_i[0], ra[i])


def test_clone_and_select():
    x, r1, r2 = randn(5), randn(5), randn(5)
    assert torch.allclose(rules.clone_rule(x, r1, r2), r1 + r2, rtol=1e-6)
    assert torch.equal(rules.clone_rule(torch.zeros(2, dtype=torch.float64), r1[:2], r2[:2]), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(rules.select_rule(x, r1), r1, rtol=1e-6)


def test_matmul_rule_halves_and_conserves():
    left, right, r = randn(2, 3, 4), randn(2, 4, 5), randn(2, 3, 5)
    rl, rr = rules.matmul_rule(left, right, r)
    assert torch.allclose(rl.sum(), r.sum() / 2) and torch.allclose(rr.sum(), r.sum() / 2)


def test_bounded_input_rule_conserves_and_handles_constant_input():
    patches, w, r = randn(2, 3, 8).clamp(-1, 1), randn(4, 8), randn(2, 3, 4)
    low, high = torch.full((2,), -1.0, dtype=torch.float64), torch.full((2,), 1.0, dtype=torch.float64)
    out = rules.bounded_input_rule(patches, w, r, low, high)
    assert torch.allclose(out.sum(), r.sum(), rtol=1e-6)
    constant = torch.full((1, 3, 8), 0.5, dtype=torch.float64)
    half = torch.tensor([0.5], dtype=torch.float64)
    out = rules.bounded_input_rule(constant, w, r[:1], half, half)
    assert torch.isfinite(out).all()


def test_rule_sets():
    assert rules.get_rule_set("paper") is rules.PAPER and rules.get_rule_set("plain") is rules.PLAIN
    with pytest.raises(ValueError, match="choose one of"):
        rules.get_rule_set("epsilon")


def test_in_place_safe_divide_equals_safe_divide():
    b = torch.tensor([0.0, -1e-9, 1e-9, -5.0, 3.0], dtype=torch.float64)
    a = torch.arange(1.0, 6.0, dtype=torch.float64)
    assert torch.equal(rules._safe_divide_into(a, b.clone()), rules.safe_divide(a, b))
