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


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, hidden, init_values=None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """timm's layout; as there: ``init_values`` adds LayerScale, ``reg_tokens`` register tokens
    after [CLS] (with ``no_embed_class`` position embeddings, as timm's ``*_reg4`` models),
    ``global_pool`` 'token' / 'avg' (mean of the patch tokens), ``fc_norm`` (default: for
    'avg') moves the final norm after the pooling, ``class_token=False`` drops [CLS]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=10, embed_dim=64, depth=4,
                 num_heads=4, mlp_ratio=4.0, init_values=None, reg_tokens=0, global_pool="token",
                 fc_norm=None, class_token=True):
        super().__init__()
        self.global_pool = global_pool
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = reg_tokens > 0
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n + (0 if self.no_embed_class else self.num_prefix_tokens),
                                                  embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, int(embed_dim * mlp_ratio), init_values)
                                      for _ in range(depth)])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes)

    # timm's split of the forward: features, then pooling and head
    def _prefix(self, x):
        tokens = [self.cls_token, self.reg_token]
        return [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]

    def _pos_embed(self, x):
        if self.no_embed_class:
            return torch.cat([*self._prefix(x), x + self.pos_embed], dim=1)
        return torch.cat([*self._prefix(x), x], dim=1) + self.pos_embed

    def forward_features(self, x):
        return self.norm(self.blocks(self._pos_embed(self.patch_embed(x))))

    def pool(self, x):
        return x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]

    def forward_head(self, x):
        return self.head(self.fc_norm(self.pool(x)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class VisionTransformerDistilled(VisionTransformer):
    """timm's distilled DeiT: a distillation token after [CLS], a second head on it; at
    inference the logits are the mean of both heads."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.num_prefix_tokens = 2
        self.no_embed_class = False
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
