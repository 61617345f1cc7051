"""The one min-max normaliser every map goes through (results, GradCAM, perturbation, overlays)."""
from __future__ import annotations

import torch

from relprop.result import normalize


def test_each_sample_to_unit_range():
    x = torch.tensor([[1.0, 3.0, 2.0], [-4.0, 0.0, -2.0]])
    assert torch.equal(normalize(x), torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]]))


def test_constant_and_empty_maps_become_zeros_but_broken_maps_stay_broken():
    x = torch.tensor([[2.0, 2.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    out = normalize(x)
    assert torch.equal(out[0], torch.zeros(2))
    assert out[1].isnan().all() and not torch.isfinite(out[2]).all()
    assert torch.equal(normalize(torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool)), torch.zeros(1, 2))


def test_kept_entries_set_the_range_and_others_follow_it():
    x = torch.tensor([[5.0, 1.0, 3.0, 100.0]])
    keep = torch.tensor([[True, True, True, False]])
    assert torch.equal(normalize(x, keep), torch.tensor([[1.0, 0.0, 0.5, 24.75]]))
