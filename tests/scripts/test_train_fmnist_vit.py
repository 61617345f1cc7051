"""The bundled ViT's training recipe: its initialisation helpers leave a plain, reloadable ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ViTForImageClassification

from relprop.registry import find_layer_list
from tests.conftest import load_script
from tests.eval.eval_fakes import make_tiny_vit

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_fmnist_vit.py"


@pytest.fixture(scope="module")
def recipe():
    return load_script(SCRIPT)


def projections(recipe, model: ViTForImageClassification) -> list[tuple[torch.nn.Linear, ...]]:
    return [recipe.attention_projections(layer) for layer in find_layer_list(model.vit)]


def test_factor_pair_is_the_truncated_svd(recipe) -> None:
    target = torch.randn(6, 6, dtype=torch.float64)
    left, right = recipe.factor_pair(target, 6)
    torch.testing.assert_close(left @ right.T, target)
    left, right = recipe.factor_pair(target, 2)
    u, s, vh = torch.linalg.svd(target)
    torch.testing.assert_close(left @ right.T, u[:, :2] @ torch.diag(s[:2]) @ vh[:2])


def test_mimetic_init_sets_attention_products_and_nothing_else(recipe) -> None:
    model = make_tiny_vit()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recipe.use_mimetic_attention_init(model, seed=0, qk=(0.0, 1.0), vo=(0.0, 1.0))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = {id(linear.weight) for block in projections(recipe, model) for linear in block}
    assert changed == {name for name, p in model.named_parameters() if id(p) in expected}
    assert len(changed) == 2 * 4
    dim, heads = model.config.hidden_size, model.config.num_attention_heads
    head_dim = dim // heads
    for query, key, value, out in projections(recipe, model):
        w_q, w_k = query.weight.double(), key.weight.double()
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            product = w_q[rows].T @ w_k[rows]  # x @ W_q,h @ W_k,h^T @ x^T is the head's score
            # Best rank-head_dim approximation of I (noise 0): a symmetric projection of that rank.
            torch.testing.assert_close(product, product.T, atol=1e-6, rtol=0)
            torch.testing.assert_close(product @ product, product, atol=1e-5, rtol=0)
            assert abs(torch.trace(product).item() - head_dim) < 1e-4
        value_output = value.weight.double().T @ out.weight.double().T
        torch.testing.assert_close(value_output, -torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)


def test_mimetic_init_is_seeded_and_saves_as_a_plain_vit(recipe, tmp_path: Path) -> None:
    first, second = make_tiny_vit(), make_tiny_vit()
    recipe.use_sincos_positions(first)
    recipe.use_mimetic_attention_init(first, seed=3)
    recipe.use_mimetic_attention_init(second, seed=3)
    for a, b in zip(projections(recipe, first), projections(recipe, second)):
        assert all(torch.equal(x.weight, y.weight) for x, y in zip(a, b))
    first.save_pretrained(tmp_path)
    reloaded = ViTForImageClassification.from_pretrained(tmp_path).eval()
    size = first.config.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, first.eval()(pixel_values=x).logits)
