import pytest
import torch

from relprop.eval.images import Normalization
from relprop.eval.metrics import PERTURBATION_FRACTIONS
from relprop.eval.perturbation import (PerturbationConfig, perturbed_predictions, ranking_scores,
                                       removal_masks)
from relprop.result import normalize

from eval_fakes import IMAGE_SIZE, PATCH, FakeExplainer


def test_removal_masks_by_hand():
    scores = torch.tensor([[[0.1, 0.4],
                            [0.3, 0.2]]])
    fractions = (0.25, 0.5, 0.75)  # k = int(4 * f) = 1, 2, 3
    pos = removal_masks(scores, fractions, negative=False, image_size=(2, 2))[0].int()
    # most relevant first: 0.4 at (0,1), then 0.3 at (1,0), then 0.2 at (1,1)
    assert pos.tolist() == [[[0, 1], [0, 0]], [[0, 1], [1, 0]], [[0, 1], [1, 1]]]
    neg = removal_masks(scores, fractions, negative=True, image_size=(2, 2))[0].int()
    # least relevant first: 0.1 at (0,0), then 0.2 at (1,1), then 0.3 at (1,0)
    assert neg.tolist() == [[[1, 0], [0, 0]], [[1, 0], [0, 1]], [[1, 0], [1, 1]]]


def test_removed_pixel_counts_follow_the_authors_int_truncation():
    masks = removal_masks(torch.rand(1, 224, 224), PERTURBATION_FRACTIONS, False, (224, 224))
    # int(50176 * f): 5017.6, 10035.2, 15052.8, 20070.4, 25088, 30105.6, 35123.2, 40140.8, 45158.4
    assert masks.sum(dim=(2, 3))[0].tolist() == [5017, 10035, 15052, 20070, 25088, 30105, 35123, 40140, 45158]


def test_patch_ranking_removes_whole_patches():
    grid = torch.tensor([[[4.0, 1.0],
                          [3.0, 2.0]]])  # 2x2 patches of 2x2 pixels on a 4x4 image
    masks = removal_masks(grid, (0.5,), negative=False, image_size=(4, 4))[0, 0].int()
    assert masks.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_normalize_guards_constant_maps():
    maps = torch.stack([torch.full((2, 2), 3.0), torch.tensor([[1.0, 3.0], [2.0, 5.0]])])
    out = normalize(maps)
    assert out[0].tolist() == [[0, 0], [0, 0]]
    assert out[1].tolist() == [[0, 0.5], [0.25, 1]]
    # a broken map is not disguised as a constant one
    assert normalize(torch.tensor([[[float("nan"), 1.0]]])).isnan().all()


def test_pixel_level_map_pooled_for_patch_ranking(tiny_vit):
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    res = FakeExplainer(tiny_vit).explain(x, "lrp")
    config = PerturbationConfig(image_size=(IMAGE_SIZE, IMAGE_SIZE), rank="patch", patch_size=PATCH)
    pooled = ranking_scores(res, config)
    assert pooled.shape == (2, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)
    token = FakeExplainer(tiny_vit).explain(x, "bright")  # patch means of the same map
    assert torch.allclose(pooled, ranking_scores(token, config), atol=1e-6)
    with pytest.raises(ValueError, match="patch_size"):
        PerturbationConfig(rank="patch")


def test_batched_predictions_equal_the_authors_per_step_loop(tiny_vit):
    torch.manual_seed(1)
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    vis = normalize(torch.rand(3, IMAGE_SIZE, IMAGE_SIZE))
    norm = Normalization((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    logits_fn = lambda x: tiny_vit(pixel_values=x).logits  # noqa: E731
    for negative in (False, True):
        masks = removal_masks(vis, PERTURBATION_FRACTIONS, negative, (IMAGE_SIZE, IMAGE_SIZE))
        # chunk 5 cuts across images and steps
        ours = perturbed_predictions(logits_fn, images, masks, torch.zeros_like(images), norm, chunk=5)
        # the authors' loop: per step, topk over the flattened map, scatter 0 in every channel
        ranked = (-vis if negative else vis).reshape(3, -1)
        with torch.no_grad():
            for step, fraction in enumerate(PERTURBATION_FRACTIONS):
                _, idx = torch.topk(ranked, int(IMAGE_SIZE * IMAGE_SIZE * fraction), dim=-1)
                data = images.clone().reshape(3, 3, -1).scatter_(-1, idx.unsqueeze(1).repeat(1, 3, 1), 0)
                expected = logits_fn(norm(data.reshape(images.shape))).argmax(-1)
                assert ours[:, step].tolist() == expected.tolist()
