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
# decoders (no authors' code): the paper's equations, as for vision: the explained position's row
# of every block's map, rolled out over all blocks without normalisation
DECODER_DEFAULTS = VISION_DEFAULTS


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
    library : str
        ``"transformers"`` (the model must also be a ``PreTrainedModel``) or ``"timm"``.
    example : str
        A model of the family, shown in the README.
    method_defaults : dict
        Method name -> option defaults; empty: the vision or text defaults (the authors' code).
    token_grids : callable, optional
        ``(model, patch grid) -> [(rows, cols)]``, one per explained attention block: the token
        grid the block attends over, for hierarchical models whose attention runs in windows and
        whose grid shrinks at each patch merging (Swin; see `relprop.tokens`). None: every block
        attends over the same token sequence.
    scores_at : str
        Where in the ``logits`` field the scores are: ``""`` (it is [B, classes]) or ``"last"``
        (it is [B, N, V], scores per position, as a causal language model's next-token logits:
        each sample's scores are read at its last real token, the last where ``attention_mask``
        is 1, so left and right padding both work).
    forward_kwargs : dict
        Arguments the model's forward always gets (decoders: ``use_cache=False``, as a key-value
        cache in the output cannot be exported).
    positions_from_mask : bool
        Unless the inputs hold ``position_ids``, pass ones that number each sample's real tokens
        from 0 (as ``generate()`` does; padding gets 1): a left-padded sample is then computed,
        and explained, as it is alone. Otherwise its positions would be shifted by its padding,
        which changes absolute position embeddings (GPT-2) and, with rotary embeddings, the
        relevance split (their rotation depends on the absolute position, not only on the
        distance that the attention scores see).
    readout : callable
        ``model -> str``: which tokens' outputs the model's head reads, i.e. what the methods'
        "pooled row" (of an attention map, of a rollout) is. ``"cls"``: the [CLS] row (token 0).
        ``"mean"``: the mean of the content tokens' rows (BEiT with ``use_mean_pooling``: its
        head reads the mean of the patch tokens; Swin: the average pool of the last stage's tokens). ``"cls+mean"``: half the [CLS] row plus half
        the content tokens' mean row (DINOv2: its head reads [CLS] concatenated with the mean of
        the patch tokens, so each half of the features gets half the weight). ``"last"``: each
        sample's last real token (decoders: the position whose next-token logits, or whose pooled
        state, the head reads). Prefix tokens other than [CLS] (distillation, register tokens)
        never take part.
    prompts : bool
        The model also takes text prompts (``input_ids``, optional ``attention_mask``, [P, L])
        that each image is scored against (CLIP zero-shot: class ``p`` is prompt ``p``); they
        are the same for every image of a batch, and only the images are explained.
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
    readout: Callable[[Any], str] = lambda model: "cls"
    prompts: bool = False
    library: str = "transformers"
    example: str = ""
    method_defaults: dict = field(default_factory=dict)
    token_grids: Optional[Callable[[Any, tuple[int, int]], list[tuple[int, int]]]] = None
    scores_at: str = ""
    forward_kwargs: dict = field(default_factory=dict)
    positions_from_mask: bool = False

    def defaults(self) -> dict:
        return self.method_defaults or (VISION_DEFAULTS if self.modality == "image" else TEXT_DEFAULTS)


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (`FAMILIES`); see CONTRIBUTING.md.

    Parameters
    ----------
    family : Family

    Returns
    -------
    Family
        ``family`` itself.
    """
    FAMILIES.append(family)
    return family


def families() -> list[str]:
    """The supported model families (``relprop.families()``).

    Returns
    -------
    list of str
        ``"<family>: <class>, <class>, ..."`` per registered family.
    """
    return [f"{f.name}: {', '.join(f.classes)}" for f in FAMILIES]


def supported_text() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.classes)})" for f in FAMILIES)


def class_names(model: Any) -> list[str]:
    """Names of the model's class and of its bases, most derived first: a subclass of a
    supported class is supported (timm and transformers need not be importable to match)."""
    return [cls.__name__ for cls in type(model).__mro__]


def family_of(model: torch.nn.Module) -> Family:
    """The registered family of ``model``: the first match of its most derived class.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    Family

    Raises
    ------
    UnsupportedModelError
        If no family covers the model (the message lists the families), or the family's
        ``check`` refuses its configuration.
    """
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


def _beit_readout(model) -> str:
    return "mean" if getattr(model.config, "use_mean_pooling", True) else "cls"


def _dinov2_prefix(model) -> int:
    return 1 + int(getattr(model.config, "num_register_tokens", 0))


register_family(Family("BEiT", ("BeitForImageClassification",), "image", readout=_beit_readout,
                       example="microsoft/beit-base-patch16-224"))
register_family(Family("DINOv2", ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"),
                       "image", prefix_tokens=_dinov2_prefix, readout=lambda model: "cls+mean",
                       example="facebook/dinov2-small-imagenet1k-1-layer"))
register_family(Family("CLIP zero-shot", ("CLIPModel",), "image", logits="logits_per_image", prompts=True,
                       scope="vision_model", example="openai/clip-vit-base-patch32"))
# headless: no class scores, explained for a callable target (e.g. similarity to a reference)
register_family(Family("CLIP image encoder", ("CLIPVisionModelWithProjection", "CLIPVisionModel"), "image",
                       logits=None, example="openai/clip-vit-base-patch32"))
register_family(Family("ViT backbone", ("ViTModel",), "image", logits=None,
                       example="google/vit-base-patch16-224-in21k"))
register_family(Family("DINOv2 backbone", ("Dinov2Model", "Dinov2WithRegistersModel"), "image", logits=None,
                       prefix_tokens=_dinov2_prefix, example="facebook/dinov2-small"))
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


def _swin_grids(model, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Swin: the patch grid in the first stage, halved (rounded up) by each patch merging."""
    grids, (rows, cols) = [], grid
    for depth in model.config.depths:
        grids += [(rows, cols)] * depth
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    return grids


# Swin: window attention (shifted in every other block) over a token grid that each patch merging
# halves; no class token, the classifier reads the average of the last stage's tokens. The methods
# on it (README, "Swin"): each block's A, ∇A, R_A placed over its stage's token grid (block diagonal
# in the windows, through the cyclic shift; `relprop.tokens`); the pooled row = the mean of all rows;
# across a patch merging a row goes to the 2x2 finer tokens, shared equally (attn_gradcam: copied);
# maps over the first stage's grid (image / patch).
register_family(Family("Swin", ("SwinForImageClassification",), "image", prefix_tokens=lambda model: 0,
                       readout=lambda model: "mean", token_grids=_swin_grids, example="microsoft/swin-tiny-patch4-window7-224"))
register_family(Family("ELECTRA", ("ElectraForSequenceClassification",), "text", preset="text"))
# ALBERT shares one layer's weights across depth: each call of it is its own attention site
register_family(Family("ALBERT", ("AlbertForSequenceClassification",), "text", preset="text"))


def _modernbert_pooling(model) -> str:
    return model.config.classifier_pooling          # "cls" or "mean" (the config allows no other)


register_family(Family("ModernBERT", ("ModernBertForSequenceClassification",), "text", preset="text",
                       readout=_modernbert_pooling))
register_family(Family("DeBERTa-v2", ("DebertaV2ForSequenceClassification",), "text", preset="text"))


# -- decoder language models ------------------------------------------------------------------
# Causal attention, no [CLS]: what is explained is each sample's last real token (the readout
# "last"): a causal LM's next-token logits there (scores_at="last", target = a token id), or the
# pooled state a sequence-classification head reads there (the head itself finds the last
# non-padding token). use_cache=False: a key-value cache in the output cannot be exported.
_DECODER: dict[str, Any] = dict(modality="text", preset="text", readout=lambda model: "last",
                                method_defaults=DECODER_DEFAULTS, forward_kwargs={"use_cache": False},
                                positions_from_mask=True)


def _register_decoder(name: str, causal_lm: tuple[str, ...], classifier: tuple[str, ...], example: str) -> None:
    register_family(Family(name, causal_lm, scores_at="last", example=example, **_DECODER))
    register_family(Family(f"{name} classifier", classifier, example=example, **_DECODER))


_register_decoder("GPT-2", ("GPT2LMHeadModel",), ("GPT2ForSequenceClassification",), "openai-community/gpt2")
_register_decoder("Llama", ("LlamaForCausalLM",), ("LlamaForSequenceClassification",), "meta-llama/Llama-3.2-1B")
_register_decoder("Qwen2", ("Qwen2ForCausalLM",), ("Qwen2ForSequenceClassification",), "Qwen/Qwen2.5-0.5B")
_register_decoder("Mistral", ("MistralForCausalLM",), ("MistralForSequenceClassification",),
                  "mistralai/Mistral-7B-v0.1")
_register_decoder("Gemma2", ("Gemma2ForCausalLM",), ("Gemma2ForSequenceClassification",), "google/gemma-2-2b")
_register_decoder("Gemma3", ("Gemma3ForCausalLM",), ("Gemma3TextForSequenceClassification",),
                  "google/gemma-3-1b-pt")
# Gemma4: the text-only causal LM (per-layer token embeddings, sliding and full attention layers)
register_family(Family("Gemma4", ("Gemma4ForCausalLM",), scores_at="last", **_DECODER))
