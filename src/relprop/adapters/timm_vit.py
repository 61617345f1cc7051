"""timm ``VisionTransformer`` (class-token pooling, the original ViT/DeiT recipe).

timm itself is optional: the adapter only reads the model's attributes.
"""
from __future__ import annotations

import torch

from ..architecture import Architecture, Block, HeadBranch, Linear
from ..errors import UnsupportedModelError
from .base import labels_of
from .vision import VisionAdapter


def _is_identity(module) -> bool:
    return module is None or isinstance(module, torch.nn.Identity)


class TimmViTAdapter(VisionAdapter):
    family = "timm VisionTransformer"

    @classmethod
    def matches(cls, model):
        return (type(model).__name__ in ("VisionTransformer", "DistilledVisionTransformer")
                and all(hasattr(model, a) for a in ("patch_embed", "blocks", "cls_token", "pos_embed", "head")))

    def __init__(self, model, dtype):
        super().__init__(model, dtype)
        self._check_supported(model)
        proj = model.patch_embed.proj
        self.patch_weight = self.tensor(proj.weight)
        self.patch_bias = self.tensor(proj.bias)
        prefix = [model.cls_token]
        heads = [model.head]
        if getattr(model, "dist_token", None) is not None:
            prefix.append(model.dist_token)
            heads.append(model.head_dist)
        self.prefix = torch.cat([self.tensor(t) for t in prefix], dim=1)
        self.positions = self.tensor(model.pos_embed)
        self.patch_size = tuple(proj.kernel_size)
        img_size = getattr(model.patch_embed, "img_size", None)
        if img_size is None:
            grid = int(round((self.positions.shape[1] - self.prefix.shape[1]) ** 0.5))
            img_size = (grid * self.patch_size[0], grid * self.patch_size[1])
        self.image_size = tuple(img_size)
        self.num_channels = proj.in_channels
        blocks = []
        for blk in model.blocks:
            qkv = blk.attn.qkv
            dim = qkv.in_features
            weight, bias = self.tensor(qkv.weight), self.tensor(qkv.bias)
            parts = [(weight[i * dim:(i + 1) * dim], None if bias is None else bias[i * dim:(i + 1) * dim])
                     for i in range(3)]
            blocks.append(Block(
                query=Linear(*parts[0]), key=Linear(*parts[1]), value=Linear(*parts[2]),
                out=self.linear(blk.attn.proj), fc1=self.linear(blk.mlp.fc1), fc2=self.linear(blk.mlp.fc2),
                norm1=self.layer_norm(blk.norm1), norm2=self.layer_norm(blk.norm2),
                activation=blk.mlp.act, num_heads=blk.attn.num_heads, pre_norm=True, qkv_fork="fused"))
        head = [HeadBranch(token, [self.linear(h)], []) for token, h in enumerate(heads)]
        self.architecture = Architecture(blocks, self.layer_norm(model.norm), head,
                                         prefix_tokens=self.prefix.shape[1], modality="image",
                                         labels=labels_of(model))

    @staticmethod
    def _check_supported(model):
        problems = []
        if getattr(model, "global_pool", "token") != "token":
            problems.append(f"global_pool={model.global_pool!r} (only 'token' pooling)")
        if getattr(model, "num_reg_tokens", 0):
            problems.append("register tokens")
        if getattr(model, "no_embed_class", False):
            problems.append("no_embed_class=True")
        for name in ("norm_pre", "fc_norm"):
            if not _is_identity(getattr(model, name, None)):
                problems.append(name)
        for blk in model.blocks:
            for name in ("ls1", "ls2"):
                if not _is_identity(getattr(blk, name, None)):
                    problems.append("LayerScale")
            for name in ("q_norm", "k_norm"):
                if not _is_identity(getattr(blk.attn, name, None)):
                    problems.append("q/k normalisation")
            if not isinstance(blk.norm1, torch.nn.LayerNorm):
                problems.append(f"{type(blk.norm1).__name__} norm")
        if not isinstance(model.head, torch.nn.Linear):
            problems.append(f"head {type(model.head).__name__}")
        if problems:
            raise UnsupportedModelError("this timm VisionTransformer uses features relprop does not propagate "
                                        f"relevance through: {', '.join(sorted(set(problems)))}")
