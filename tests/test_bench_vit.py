"""benchmarks/bench_vit.py --reference: the authors' ViT gets the Hugging Face model's weights.

The comparison needs a local checkout of github.com/hila-chefer/Transformer-Explainability (and
einops): set RELPROP_REFERENCE_CODE to its folder. Nothing is fetched; without it the check is skipped.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

BENCH_VIT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vit.py"
REFERENCE_CODE = os.environ.get("RELPROP_REFERENCE_CODE")


@pytest.fixture(scope="module")
def bench_vit():
    return load_script(BENCH_VIT)


@pytest.mark.skipif(not REFERENCE_CODE, reason="set RELPROP_REFERENCE_CODE to a checkout of "
                                               "github.com/hila-chefer/Transformer-Explainability")
def test_reference_weight_transfer_gives_equal_logits_and_map(bench_vit):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                       num_labels=10, layer_norm_eps=1e-12)
    model = ViTForImageClassification(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = bench_vit.check_reference(model, REFERENCE_CODE)
    # float64: the same function of the same weights, so only rounding differs
    assert check["float64"]["logits_max_abs_diff"] <= 1e-12 * check["float64"]["logits_max_abs"]
    assert check["float64"]["map_max_abs_diff_rel"] <= 1e-9
    # float32 (what is timed): the logits to float32 rounding
    assert check["float32"]["logits_max_abs_diff"] <= 1e-5 * check["float32"]["logits_max_abs"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.Tensor.cuda is not None and "lambda" not in torch.Tensor.cuda.__qualname__  # CPU shim undone


def test_reference_refuses_a_folder_without_the_authors_code(bench_vit, tmp_path):
    with pytest.raises(SystemExit, match="no baselines/ViT/ViT_LRP.py there; pass a local checkout"):
        bench_vit.load_reference(str(tmp_path))
