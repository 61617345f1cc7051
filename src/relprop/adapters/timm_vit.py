"""timm ``VisionTransformer`` (class-token pooling, the original ViT/DeiT recipe), its distilled
DeiT subclass, and either of them inside transformers' ``TimmWrapperForImageClassification``
(what ``AutoModelForImageClassification`` returns for a timm checkpoint).

timm itself is optional: the adapter only reads the model's attributes.
"""
from __future__ import annotations

import torch

from ..architecture import Architecture, Block, HeadBranch, Linear
from ..errors import UnsupportedModelError
from .base import class_names, labels_of
from .vision import VisionAdapter

_ATTRIBUTES = ("patch_embed", "blocks", "cls_token", "pos_embed", "head")
# transformers' wrapper: its forward returns ``timm_model(pixel_values)`` as the logits
_WRAPPER = "TimmWrapperForImageClassification"


def _is_identity(module) -> bool:
    return module is None or isinstance(module, torch.nn.Identity)


def _is_timm_vit(model) -> bool:
    # timm's VisionTransformer or a subclass (VisionTransformerDistilled, formerly
    # DistilledVisionTransformer), recognised by name: timm need not be importable
    return "VisionTransformer" in class_names(model) and all(hasattr(model, a) for a in _ATTRIBUTES)


def wrapped_timm_model(model):
    """The timm model inside a ``TimmWrapperForImageClassification``, else None."""
    return getattr(model, "timm_model", None) if _WRAPPER in class_names(model) else None


class TimmViTAdapter(VisionAdapter):
    family = "timm VisionTransformer"

    @classmethod
    def matches(cls, model):
        wrapped = wrapped_timm_model(model)
        return _is_timm_vit(model if wrapped is None else wrapped)

    def __init__(self, model, dtype):
        super().__init__(model, dtype)
        wrapped = wrapped_timm_model(model)
        vit = model if wrapped is None else wrapped
        self._check_supported(vit)
        proj = vit.patch_embed.proj
        self.patch_weight = self.tensor(proj.weight)
        self.patch_bias = self.tensor(proj.bias)
        prefix = [vit.cls_token]
        heads = [vit.head]
        if getattr(vit, "dist_token", None) is not None:
            # distilled DeiT: the logits are the mean of the two heads (timm's inference forward)
            prefix.append(vit.dist_token)
            heads.append(vit.head_dist)
        self.prefix_tokens = [self.tensor(t) for t in prefix]
        self.positions = self.tensor(vit.pos_embed)
        self.patch_size = tuple(proj.kernel_size)
        img_size = getattr(vit.patch_embed, "img_size", None)
        if img_size is None:
            grid = int(round((self.positions.shape[1] - self.num_prefix) ** 0.5))
            img_size = (grid * self.patch_size[0], grid * self.patch_size[1])
        self.image_size = tuple(img_size)
        self.num_channels = proj.in_channels
        blocks = []
        for blk in vit.blocks:
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
        self.architecture = Architecture(blocks, self.layer_norm(vit.norm), head,
                                         prefix_tokens=self.num_prefix, modality="image",
                                         labels=labels_of(model))

    @staticmethod
    def _check_supported(model):
        problems = []
        if getattr(model, "global_pool", "token") != "token":
            problems.append(f"global_pool={model.global_pool!r} (only 'token' pooling)")
        if model.cls_token is None:
            problems.append("no class token")
        if model.pos_embed is None:
            problems.append("no learned position embedding")
        if getattr(model, "num_reg_tokens", 0):
            problems.append("register tokens")
        distilled = getattr(model, "dist_token", None) is not None
        expected_prefix = 2 if distilled else 1
        if getattr(model, "num_prefix_tokens", expected_prefix) != expected_prefix:
            problems.append(f"{model.num_prefix_tokens} prefix tokens")
        if getattr(model, "no_embed_class", False):
            problems.append("no_embed_class=True")
        for name in ("norm_pre", "fc_norm"):
            if not _is_identity(getattr(model, name, None)):
                problems.append(name)
        if not _is_identity(getattr(model.patch_embed, "norm", None)):
            problems.append("patch_embed.norm")
        for blk in model.blocks:
            for name in ("ls1", "ls2"):
                if not _is_identity(getattr(blk, name, None)):
                    problems.append("LayerScale")
            for name in ("q_norm", "k_norm"):
                if not _is_identity(getattr(blk.attn, name, None)):
                    problems.append("q/k normalisation")
            if not _is_identity(getattr(blk.attn, "norm", None)) or not _is_identity(getattr(blk.mlp, "norm", None)):
                problems.append("scale_norm / scale_mlp_norm")
            if not isinstance(blk.norm1, torch.nn.LayerNorm):
                problems.append(f"{type(blk.norm1).__name__} norm")
        for name in ("head", "head_dist") if distilled else ("head",):
            if not isinstance(getattr(model, name), torch.nn.Linear):
                problems.append(f"{name} {type(getattr(model, name)).__name__}")
        if problems:
            raise UnsupportedModelError(f"this timm {type(model).__name__} uses features relprop does not propagate "
                                        f"relevance through: {', '.join(sorted(set(problems)))}")
