"""Hugging Face ViT and DeiT image classifiers (transformers 4.x and 5.x layouts)."""
from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ..architecture import Architecture, Block, HeadBranch
from ..errors import UnsupportedModelError
from .base import find_layer_list, first_class_name, get_path, labels_of
from .vision import VisionAdapter

_SUPPORTED = {
    "ViTForImageClassification": ("vit", ["classifier"]),
    "DeiTForImageClassification": ("deit", ["classifier"]),
    "DeiTForImageClassificationWithTeacher": ("deit", ["cls_classifier", "distillation_classifier"]),
}


class HFViTAdapter(VisionAdapter):
    family = "Hugging Face ViT / DeiT"

    @classmethod
    def matches(cls, model):
        return first_class_name(model, _SUPPORTED) is not None and hasattr(model, "config")

    def __init__(self, model, dtype):
        super().__init__(model, dtype)
        base_name, head_names = _SUPPORTED[first_class_name(model, _SUPPORTED)]
        base = getattr(model, base_name)
        config = model.config
        emb = base.embeddings
        projection = get_path(emb, "patch_embeddings.projection")
        self.patch_weight = self.tensor(projection.weight)
        self.patch_bias = self.tensor(projection.bias)
        prefix = [emb.cls_token]
        if getattr(emb, "distillation_token", None) is not None:
            prefix.append(emb.distillation_token)
        self.prefix_tokens = [self.tensor(t) for t in prefix]
        self.positions = self.tensor(emb.position_embeddings)
        size = config.image_size
        patch = config.patch_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.num_channels = config.num_channels
        activation = ACT2FN[config.hidden_act]
        blocks = []
        for layer in find_layer_list(base):
            blocks.append(Block(
                query=self.linear(get_path(layer, "attention.q_proj", "attention.attention.query")),
                key=self.linear(get_path(layer, "attention.k_proj", "attention.attention.key")),
                value=self.linear(get_path(layer, "attention.v_proj", "attention.attention.value")),
                out=self.linear(get_path(layer, "attention.o_proj", "attention.output.dense")),
                fc1=self.linear(get_path(layer, "mlp.fc1", "intermediate.dense")),
                fc2=self.linear(get_path(layer, "mlp.fc2", "output.dense")),
                norm1=self.layer_norm(layer.layernorm_before),
                norm2=self.layer_norm(layer.layernorm_after),
                activation=activation, num_heads=config.num_attention_heads, pre_norm=True,
                qkv_fork="fused"))
        head = []
        for token, name in enumerate(head_names):
            classifier = getattr(model, name)
            if not isinstance(classifier, torch.nn.Linear):
                raise UnsupportedModelError(f"{type(model).__name__}.{name} is {type(classifier).__name__}; "
                                            "relprop needs a linear classifier on the [CLS] token")
            head.append(HeadBranch(token, [self.linear(classifier)], []))
        self.architecture = Architecture(blocks, self.layer_norm(base.layernorm), head,
                                         prefix_tokens=self.num_prefix, modality="image",
                                         labels=labels_of(model))
