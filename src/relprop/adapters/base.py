"""What every model adapter provides, and helpers shared by them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..architecture import Architecture, LayerNorm, Linear
from ..errors import InputError


@dataclass
class Prepared:
    """A validated batch, embedded and ready for the encoder blocks."""

    hidden: torch.Tensor                 # [B, N, D] encoder input
    valid: torch.Tensor                  # [B, N] bool: real (non-padding) tokens
    content: torch.Tensor                # indices of the tokens a map reports on
    extras: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """Translates one model family into an `Architecture` and embeds its inputs."""

    family: str = ""
    architecture: Architecture
    #: per-method option defaults that differ by modality (the authors' text code differs
    #: from their vision code); every such default stays an option of the method
    method_defaults: dict[str, dict[str, Any]] = {}

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.device = next(model.parameters()).device

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter handles ``model``; match its class or a base class
        (`class_names`), so that subclasses of a supported model are accepted."""
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Prepared:
        raise NotImplementedError

    def batch_size(self, inputs: Any) -> int:
        raise NotImplementedError

    def finalize(self, scores: torch.Tensor, prepared: Prepared, input_level: bool) -> torch.Tensor:
        """Last touches on a map (text adapters zero the padding)."""
        return scores

    def input_relevance(self, prepared: Prepared, relevance: torch.Tensor, rules) -> torch.Tensor:
        """Map relevance at the encoder input to the model's input (pixels or tokens)."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------
    def tensor(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A parameter as used by the engine: detached (a view, no copy) in the compute dtype.

        A tensor made under ``torch.inference_mode`` is copied: autograd cannot use it.
        """
        if t is None:
            return None
        t = t.detach()
        if t.is_inference():
            return t.to(self.dtype, copy=True)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def linear(self, module: torch.nn.Module) -> Linear:
        return Linear(self.tensor(module.weight), self.tensor(module.bias))

    def layer_norm(self, module: torch.nn.Module) -> LayerNorm:
        return LayerNorm(self.tensor(module.weight), self.tensor(getattr(module, "bias", None)), float(module.eps))


def class_names(model: Any) -> list[str]:
    """Names of the model's class and of its bases, most derived first: a subclass of a
    supported class is supported (timm and transformers need not be importable to match)."""
    return [cls.__name__ for cls in type(model).__mro__]


def first_class_name(model: Any, names) -> Optional[str]:
    """The most derived class of ``model`` (itself or a base) named in ``names``, or None."""
    return next((name for name in class_names(model) if name in names), None)


def get_path(obj: Any, *paths: str) -> Any:
    """The first attribute path that exists (module names differ across library versions)."""
    for path in paths:
        cur = obj
        try:
            for part in path.split("."):
                cur = getattr(cur, part)
        except AttributeError:
            continue
        return cur
    raise AttributeError(f"none of {paths} found on {type(obj).__name__}")


def find_layer_list(root: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder's list of blocks, found by type rather than by attribute name."""
    best = None
    for _, module in root.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise InputError(f"no list of Transformer blocks found in {type(root).__name__}")
    return best


def labels_of(model: torch.nn.Module) -> dict[int, str]:
    """Class names: the Hugging Face ``config.id2label``, else timm's ``pretrained_cfg['label_names']``."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    if not id2label:
        pretrained_cfg = getattr(model, "pretrained_cfg", None)
        names = pretrained_cfg.get("label_names") if isinstance(pretrained_cfg, dict) else None
        id2label = dict(enumerate(names or ()))
    return {int(k): str(v) for k, v in id2label.items()}
