"""Minimal models with timm's layouts and forwards (timm itself does not import here: it needs
torchvision): ``VisionTransformer`` (loads the timm-style golden state dict unchanged), the
distilled DeiT ``VisionTransformerDistilled`` (timm/models/deit.py), and transformers'
``TimmWrapperForImageClassification`` around either (what AutoModelForImageClassification
returns for a timm checkpoint)."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=10, embed_dim=64, depth=4,
                 num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.global_pool = "token"
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, int(embed_dim * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    # timm's split of the forward: features, then pooling and head
    def _pos_embed(self, x):
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, x):
        return self.norm(self.blocks(self._pos_embed(self.patch_embed(x))))

    def forward_head(self, x):
        return self.head(x[:, 0])

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class VisionTransformerDistilled(VisionTransformer):
    """timm's distilled DeiT: a distillation token after [CLS], a second head on it; at
    inference the logits are the mean of both heads."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.num_prefix_tokens = 2
        dim = self.cls_token.shape[-1]
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed.shape[1] + 1, dim))
        self.head_dist = nn.Linear(dim, self.head.out_features)
        self.distilled_training = False

    def _pos_embed(self, x):
        prefix = [self.cls_token.expand(x.shape[0], -1, -1), self.dist_token.expand(x.shape[0], -1, -1)]
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward_head(self, x):
        x, x_dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.distilled_training and self.training:
            return x, x_dist          # training with distillation only
        return (x + x_dist) / 2


def timm_wrapper(timm_model, id2label):
    """transformers' own ``TimmWrapperForImageClassification`` (its real forward) around
    ``timm_model``: its __init__ minus the part that needs timm (creating the timm model).
    Its post_init re-initialises the weights: load them afterwards."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
    from transformers.modeling_utils import PreTrainedModel

    config = TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=len(id2label), id2label=id2label,
                               label2id={v: k for k, v in id2label.items()})
    model = TimmWrapperForImageClassification.__new__(TimmWrapperForImageClassification)
    PreTrainedModel.__init__(model, config)
    model.timm_model = timm_model
    model.num_labels = config.num_labels
    model.post_init()
    return model
