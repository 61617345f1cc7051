"""The one registry of supported model families.

A family is a short declaration: which model classes it covers (matched on the class and its
bases, so subclasses work), its inputs (images or text), where its class scores are, how many
tokens precede the content tokens, which attention layers are explained and which rule preset
reproduces the authors' treatment of it. The engine needs nothing else: it works on the
model's own exported graph. `families()`, the README and every "unsupported model" error are
read from `FAMILIES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import InputError, UnsupportedModelError

VISION_DEFAULTS = {"attn_gradcam": {"scope": "cls_row"},
                   "transformer_attribution": {"start_layer": 0, "row_normalize": False}}
# the authors' text code: the method's rollout is row-normalised and, by default, uses the last
# layer only; GradCAM averages the gradient over the whole attention matrix
TEXT_DEFAULTS = {"attn_gradcam": {"scope": "matrix"},
                 "transformer_attribution": {"start_layer": -1, "row_normalize": True}}


@dataclass(frozen=True)
class Family:
    """How relprop reads one model family.

    Parameters
    ----------
    name : str
        Shown to users (``relprop.families()``, errors, README).
    classes : tuple of str
        Model classes covered (a model whose class or a base class has one of these names).
    modality : str
        ``"image"`` (input ``pixel_values``) or ``"text"`` (``input_ids``, ``attention_mask``).
    logits : str or None
        The output field with class scores (``""``: the output is the scores tensor); None: the
        model has none and explanations need a callable ``target``.
    prefix_tokens : callable
        ``model -> int``: tokens before the content tokens (class, distillation, register tokens).
    preset : str
        The rule preset (`rules.PRESETS`): the authors' vision or text treatment.
    scope : str
        Module path prefix of the explained attention layers ("" = all), e.g. a CLIP tower.
    pixel_input : str
        The forward argument that takes the images.
    check : callable, optional
        ``model -> None``; raises `UnsupportedModelError` for a configuration that cannot work.
    pooling : callable
        ``model -> "cls" | "mean"``: what the classifier reads, the first token after the
        prefix ("cls") or the mean of the (valid, content) tokens ("mean"); the attention
        methods report the pooled row (under "mean", the mean of the rows).
    """

    name: str
    classes: tuple[str, ...]
    modality: str
    logits: Optional[str] = "logits"
    prefix_tokens: Callable[[Any], int] = lambda model: 1
    preset: str = "vision"
    scope: str = ""
    pixel_input: str = "pixel_values"
    check: Optional[Callable[[Any], None]] = None
    pooling: Callable[[Any], str] = lambda model: "cls"
    library: str = "transformers"
    example: str = ""
    method_defaults: dict = field(default_factory=dict)

    def defaults(self) -> dict:
        return self.method_defaults or (VISION_DEFAULTS if self.modality == "image" else TEXT_DEFAULTS)


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    FAMILIES.append(family)
    return family


def families() -> list[str]:
    """Names of the supported model families, with the classes each covers."""
    return [f"{f.name}: {', '.join(f.classes)}" for f in FAMILIES]


def supported_text() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.classes)})" for f in FAMILIES)


def class_names(model: Any) -> list[str]:
    """Names of the model's class and of its bases, most derived first: a subclass of a
    supported class is supported (timm and transformers need not be importable to match)."""
    return [cls.__name__ for cls in type(model).__mro__]


def family_of(model: torch.nn.Module) -> Family:
    names = class_names(model)
    for name in names:                       # the most derived class decides
        for family in FAMILIES:
            if name in family.classes:
                if family.library == "transformers" and not _is_transformers_model(model):
                    continue                 # the name alone (a lookalike class) is not enough
                if family.check is not None:
                    family.check(model)
                return family
    wrapped = _timm_inside(model)
    what = type(model).__name__ + (f" wrapping timm's {type(wrapped).__name__}" if wrapped is not None else "")
    raise UnsupportedModelError(f"relprop does not support {what}. Supported families: {supported_text()}; "
                                "and subclasses of these")


def _is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


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
        inner = _timm_inside(model) or model
        pretrained_cfg = getattr(inner, "pretrained_cfg", None)
        names = pretrained_cfg.get("label_names") if isinstance(pretrained_cfg, dict) else None
        id2label = dict(enumerate(names or ()))
    return {int(k): str(v) for k, v in id2label.items()}


# -- timm --------------------------------------------------------------------------------------
_TIMM_WRAPPER = "TimmWrapperForImageClassification"


def _timm_inside(model):
    """The timm model inside transformers' ``TimmWrapperForImageClassification``, else None."""
    return getattr(model, "timm_model", None) if _TIMM_WRAPPER in class_names(model) else None


def _timm_vit(model):
    return _timm_inside(model) or model


def _check_timm_vit(model) -> None:
    vit = _timm_vit(model)
    problems = []
    if not all(hasattr(vit, a) for a in ("patch_embed", "blocks", "head")):
        problems.append("not a timm VisionTransformer layout")
    if getattr(vit, "global_pool", "token") != "token":
        problems.append(f"global_pool={vit.global_pool!r} (relprop reads the class token's row: use 'token')")
    if getattr(vit, "cls_token", None) is None:
        problems.append("no class token")
    if problems:
        raise UnsupportedModelError(f"this timm {type(vit).__name__} is not supported: {', '.join(problems)}")


def _check_timm_wrapper(model) -> None:
    inner = _timm_inside(model)
    if inner is None or "VisionTransformer" not in class_names(inner):
        name = type(inner).__name__ if inner is not None else "nothing"
        raise UnsupportedModelError(f"relprop does not support {type(model).__name__} wrapping timm's {name}. "
                                    f"Supported families: {supported_text()}")
    _check_timm_vit(model)


def _deit_prefix(model) -> int:
    return 2


def _timm_prefix(model) -> int:
    return int(getattr(_timm_vit(model), "num_prefix_tokens", 1))


register_family(Family("ViT", ("ViTForImageClassification",), "image", example="google/vit-base-patch16-224"))
register_family(Family("DeiT", ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), "image",
                       prefix_tokens=_deit_prefix, example="facebook/deit-base-distilled-patch16-224"))
register_family(Family("timm VisionTransformer", ("VisionTransformer",), "image", logits="", pixel_input="x",
                       library="timm",
                       prefix_tokens=_timm_prefix, check=_check_timm_vit, example="timm vit_base_patch16_224"))
register_family(Family("timm VisionTransformer in transformers", (_TIMM_WRAPPER,), "image",
                       prefix_tokens=_timm_prefix, check=_check_timm_wrapper,
                       example="AutoModelForImageClassification of a timm checkpoint"))
register_family(Family("BERT", ("BertForSequenceClassification",), "text", preset="text"))
register_family(Family("RoBERTa", ("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification"),
                       "text", preset="text"))
register_family(Family("DistilBERT", ("DistilBertForSequenceClassification",), "text", preset="text"))
register_family(Family("ELECTRA", ("ElectraForSequenceClassification",), "text", preset="text"))
# ALBERT shares one layer's weights across depth: each call of it is its own attention site
register_family(Family("ALBERT", ("AlbertForSequenceClassification",), "text", preset="text"))
def _modernbert_pooling(model) -> str:
    return model.config.classifier_pooling          # "cls" or "mean" (the config allows no other)


register_family(Family("ModernBERT", ("ModernBertForSequenceClassification",), "text", preset="text",
                       pooling=_modernbert_pooling))
register_family(Family("DeBERTa-v2", ("DebertaV2ForSequenceClassification",), "text", preset="text"))
