"""Swin's semantics (see the Swin family and `relprop.tokens`): every block's window attention,
gradient and relevance placed over the stage's token grid; the pooled row = the mean of all rows
(average-pool readout); across a patch merging a row goes to the 2x2 tokens each merged token was
made of, shared equally; maps over the first stage's grid."""
from __future__ import annotations

import pytest
import torch

import relprop
from tests.families.cases import CASES

CASE = CASES["swin"]


def _eager_float64():
    model = CASE.build("eager").double().eval()
    return model, {"pixel_values": CASE.inputs(3)["pixel_values"].double()}


def _blocks(model):
    return [block for stage in model.swin.encoder.layers for block in stage.blocks]


def _grid_of(model, block_index):
    side = model.config.image_size // model.config.patch_size
    for stage, depth in enumerate(model.config.depths):
        if block_index < depth:
            return side
        block_index -= depth
        side = (side + 1) // 2


def _window_to_grid(windows, grid, window, shift, batch):
    """Reference placement by grid coordinates: window token (window wi, position p) of a block
    whose grid was rolled by -shift sits at ((wy*w + py + shift) % grid, (wx*w + px + shift) % grid)."""
    per_side = grid // window
    count = per_side * per_side
    heads, size = windows.shape[1], windows.shape[-1]
    out = torch.zeros(batch, heads, grid * grid, grid * grid, dtype=windows.dtype)
    token = torch.empty(windows.shape[0], size, dtype=torch.long)
    for wi in range(windows.shape[0]):
        wy, wx = divmod(wi % count, per_side)
        for p in range(size):
            py, px = divmod(p, window)
            token[wi, p] = ((wy * window + py + shift) % grid) * grid + (wx * window + px + shift) % grid
    for wi in range(windows.shape[0]):
        b = wi // count
        out[b][:, token[wi][:, None], token[wi][None, :]] = windows[wi]
    return out


def test_window_attention_and_gradients_placed_over_the_token_grid():
    """A and ∇A of every block equal the eager model's window attention (and its gradient)
    placed by grid coordinates; the shifted block's A also equals attention computed from
    scratch over all token pairs of the grid (same window, relative bias, shift regions)."""
    model, inputs = _eager_float64()
    captured, tokens_in = [], []
    hooks = [block.attention.register_forward_hook(lambda m, a, out: captured.append(out[1])) for block in _blocks(model)]
    hooks += [block.layernorm_before.register_forward_hook(lambda m, a, out: tokens_in.append(out))
              for block in _blocks(model)]
    target = torch.tensor([0, 1, 2])
    logits = model(**inputs).logits
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), captured)
    internals = relprop.Explainer(model).explain(inputs, "grad_rollout", target=target,
                                                 keep_internals=True).internals
    assert len(internals.attention) == len(captured) == 4
    shifts = []
    for index, block in enumerate(_blocks(model)):
        grid, window, shift = _grid_of(model, index), int(block.window_size), int(block.shift_size)
        shifts.append(shift)
        expected_a = _window_to_grid(captured[index].detach(), grid, window, shift, 3)
        expected_g = _window_to_grid(grads[index], grid, window, shift, 3)
        assert internals.attention[index].shape == (3, captured[index].shape[1], grid * grid, grid * grid)
        # (the eager model's softmax runs in float32 even in a float64 model: 1e-6)
        assert torch.allclose(internals.attention[index], expected_a, atol=1e-6)
        assert torch.allclose(internals.attention_grad[index], expected_g, atol=1e-6 * grads[index].abs().max())
        assert torch.allclose(internals.attention[index].sum(-1), torch.ones(()).double())
    assert shifts == [0, 2, 0, 0]           # stage 2's window spans its 4x4 grid: no shift

    # from scratch for the shifted block: all pairs of the 8x8 grid
    block, x = _blocks(model)[1], tokens_in[1]
    grid, window, shift = 8, 4, 2
    heads = block.attention.num_attention_heads
    q = block.attention.q_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = block.attention.k_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * block.attention.scaling
    ys, xs = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    sy, sx = (ys - shift) % grid, (xs - shift) % grid                    # coordinates after the roll
    window_id = (sy // window) * (grid // window) + sx // window
    position = (sy % window) * window + sx % window

    def region(c):
        return (c >= grid - window).long() + (c >= grid - shift).long()
    regions = region(sy) * 3 + region(sx)
    bias = block.attention.relative_position_bias()[0][:, position[:, None], position[None, :]]
    bias = bias + torch.where(regions[:, None] != regions[None, :], -100.0, 0.0).double()
    same = window_id[:, None] == window_id[None, :]
    reference = (scores + bias).masked_fill(~same, float("-inf")).softmax(-1)
    assert torch.allclose(internals.attention[1], reference.detach(), atol=1e-10)


def _share_down(row):
    """[B, 16] over the 4x4 grid -> [B, 64] over the 8x8 grid, each value shared by its 2x2 tokens."""
    return (row.reshape(-1, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2) / 4).reshape(-1, 64)


def _plus_identity(m, normalize):
    m = m + torch.eye(m.shape[-1], dtype=m.dtype)
    return m / m.sum(-1, keepdim=True) if normalize else m


def test_mean_readout_and_patch_merging():
    """The maps are over the 8x8 grid: raw attention / partial LRP = mean of the last block's rows,
    shared over the 2x2 source tokens; rollout and transformer attribution = the mean row of the
    product of (M + I) over the 4x4 blocks, shared down, times the 8x8 blocks' (M + I); a
    normalised rollout sums to 1; Grad-CAM copies (not shares) and stays normalised."""
    model, inputs = _eager_float64()
    explainer = relprop.Explainer(model)
    target = [0, 1, 2]
    internals = explainer.explain(inputs, "transformer_attribution", target=target, keep_internals=True).internals
    a, g, r = internals.attention, internals.attention_grad, internals.attention_relevance
    assert [t.shape[-1] for t in a] == [64, 64, 16, 16]

    def rollout_reference(mixings, normalize):
        row = _plus_identity(mixings[3], normalize).mean(1)           # the mean of the rows
        row = torch.einsum("bn,bnm->bm", row, _plus_identity(mixings[2], normalize))
        row = _share_down(row)
        for block in (1, 0):
            row = torch.einsum("bn,bnm->bm", row, _plus_identity(mixings[block], normalize))
        return row

    raw = explainer.explain(inputs, "raw_attention", target=target)
    assert raw.grid == (8, 8) and raw.relevance.shape == (3, 64)
    assert torch.allclose(raw.relevance, _share_down(a[3].mean(1).mean(1)), atol=1e-12)
    assert torch.allclose(raw.relevance.sum(-1), torch.ones(()).double())

    rollout = explainer.explain(inputs, "rollout", target=target).relevance
    assert torch.allclose(rollout, rollout_reference([t.mean(1) for t in a], True), atol=1e-12)
    assert torch.allclose(rollout.sum(-1), torch.ones(()).double())

    ours = explainer.explain(inputs, "transformer_attribution", target=target).relevance
    mixings = [(g[b] * r[b]).clamp(min=0).mean(1) for b in range(4)]
    assert torch.allclose(ours, rollout_reference(mixings, False), atol=1e-12 * ours.abs().max())

    grad_rollout = explainer.explain(inputs, "grad_rollout", target=target).relevance
    mixings = [(g[b] * a[b]).clamp(min=0).mean(1) for b in range(4)]
    assert torch.allclose(grad_rollout, rollout_reference(mixings, False), atol=1e-12 * grad_rollout.abs().max())

    partial = explainer.explain(inputs, "partial_lrp", target=target, keep_internals=True)
    # the pooled row (the mean of R_A's rows), clamped, head mean: as on ViT with the pooled row
    expected = _share_down(partial.internals.attention_relevance[3].mean(-2).clamp(min=0).mean(1))
    assert torch.allclose(partial.relevance, expected, atol=1e-12 * expected.abs().max())

    cam = explainer.explain(inputs, "attn_gradcam", target=target).relevance
    weights = g[3].mean(-2).mean(-1)                                  # pooled gradient row, mean over tokens
    coarse = (a[3].mean(-2) * weights[..., None]).mean(1).clamp(min=0)
    fine = coarse.reshape(-1, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(-1, 64)
    expected = relprop.result.normalize(fine)
    assert torch.allclose(cam, expected, atol=1e-12)
    assert torch.allclose(cam.amax(-1), torch.ones(()).double())


def test_swin_sdpa_explained_like_eager_copy_and_lrp_over_pixels():
    sdpa, eager = CASE.build(None), CASE.build("eager")
    inputs = CASE.inputs(2)
    ours, theirs = relprop.Explainer(sdpa), relprop.Explainer(eager)
    for method in relprop.methods():
        a = ours.explain(inputs, method, target=[1, 3]).relevance
        b = theirs.explain(inputs, method, target=[1, 3]).relevance
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max()), method
        assert a.shape == ((2, 32, 32) if method == "lrp" else (2, 64)), method
        assert torch.isfinite(a).all() and a.abs().max() > 0, method
    assert sdpa.config._attn_implementation == "sdpa"


def test_swin_is_a_registered_family():
    from relprop.registry import families
    assert "Swin: SwinForImageClassification" in families()


@pytest.mark.parametrize("size", [28])
def test_swin_with_padded_windows(size):
    """A grid that windows do not tile (7x7, window 4: padded to 8x8 inside each block): the
    padding tokens are dropped from the placed attention (a row loses the share it gave them);
    rows of windows without padding sum to 1; a normalised rollout still sums to 1."""
    import transformers as tf
    from tests.families.cases import hf_builder
    from tests.families.cases_swin import SWIN_CONFIG

    model = hf_builder(tf.SwinConfig, tf.SwinForImageClassification, **dict(SWIN_CONFIG, image_size=size))(None)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    result = relprop.Explainer(model).explain(x, "rollout", target=0, keep_internals=True)
    assert result.grid == (7, 7) and result.relevance.shape == (2, 49)
    assert [t.shape[-1] for t in result.internals.attention] == [49, 49, 16, 16]
    for t in result.internals.attention:
        assert (t.sum(-1) <= 1 + 1e-5).all() and (t.sum(-1) > 0).all()
    unshifted = result.internals.attention[0].sum(-1).reshape(2, -1, 7, 7)
    assert torch.allclose(unshifted[..., :4, :4], torch.ones(()), atol=1e-5)     # the window without padding
    assert (unshifted[..., 4:, :] < 1 - 1e-6).all()
    assert torch.allclose(result.relevance.sum(-1), torch.ones(()), atol=1e-5)
