"""Contract case of Swin (registered into `cases.CASES`): 32x32 images, patch 4, window 4, stage
grids 8x8 (a plain and a shifted block) and 4x4 (two blocks, the window spans the grid).

``attentions=False``: the eager model returns window-shaped attention of the last block of each
stage only; `tests/families/test_swin.py` checks A and ∇A of every block, placed over the
stage's token grid, against a reference built from the model's window attention and the grid
coordinates, and the SDPA model against its eager copy.
"""
from __future__ import annotations

import transformers as tf

from tests.families.cases import Case, hf_builder, image_inputs, register

SWIN_CONFIG = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                   num_labels=5)

register(Case("swin", "image", hf_builder(tf.SwinConfig, tf.SwinForImageClassification, **SWIN_CONFIG),
              image_inputs(), attentions=False, classes=5))
