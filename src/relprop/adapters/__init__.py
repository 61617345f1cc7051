"""Model adapters, one per model family; `adapt` picks the one that fits a model."""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .base import Adapter
from .hf_text import BertAdapter, DistilBertAdapter, RobertaAdapter
from .hf_vit import HFViTAdapter
from .timm_vit import TimmViTAdapter, wrapped_timm_model

ADAPTERS: list[type[Adapter]] = [HFViTAdapter, TimmViTAdapter, BertAdapter, RobertaAdapter, DistilBertAdapter]

SUPPORTED = ("Hugging Face ViTForImageClassification, DeiTForImageClassification, "
             "DeiTForImageClassificationWithTeacher, BertForSequenceClassification, "
             "RobertaForSequenceClassification, DistilBertForSequenceClassification; "
             "timm VisionTransformer and VisionTransformerDistilled (class-token pooling), also inside "
             "TimmWrapperForImageClassification; subclasses of these")


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS.append(cls)
    return cls


def adapt(model: torch.nn.Module, dtype: torch.dtype) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model, dtype)
    name = type(model).__name__
    wrapped = wrapped_timm_model(model)
    if wrapped is not None:
        name += f" wrapping timm's {type(wrapped).__name__}"
    raise UnsupportedModelError(f"relprop does not support {name}. Supported: {SUPPORTED}.")
