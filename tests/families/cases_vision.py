"""Contract cases of the vision families beyond ViT / DeiT / timm ViT (registered into `cases.CASES`)."""
from __future__ import annotations
