"""Checking a batch against the model and turning it into the model's forward arguments."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import InputError
from .registry import Family, _timm_vit


@dataclass
class Prepared:
    """A validated batch: the model's forward arguments and what the maps report on."""

    kwargs: dict[str, torch.Tensor]
    valid: Optional[torch.Tensor] = None       # [B, N] real tokens (text); None: all (vision)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return next(iter(self.kwargs.values())).shape[0]


def image_geometry(model, family: Family) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(image size, patch size, channels) the model expects."""
    if "timm" in family.name:
        vit = _timm_vit(model)
        embed = vit.patch_embed
        proj = embed.proj
        size = getattr(embed, "img_size", None)
        if size is None:
            raise InputError(f"cannot tell the image size {type(vit).__name__} expects (no patch_embed.img_size)")
        return tuple(size), tuple(proj.kernel_size), proj.in_channels
    config = model.config
    vision = getattr(config, "vision_config", None) or config
    size, patch = vision.image_size, vision.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return size, patch, vision.num_channels


def prepare_images(model, family: Family, inputs: Any, dtype: torch.dtype, device) -> Prepared:
    pixel_values = inputs
    if isinstance(pixel_values, dict) or hasattr(pixel_values, "keys"):
        if "pixel_values" not in pixel_values:
            raise InputError("expected a tensor of pixel values or a mapping with 'pixel_values'")
        pixel_values = pixel_values["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor):
        raise InputError(f"pixel values must be a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if pixel_values.dim() == 3 else ""
        raise InputError(f"pixel values must have 4 dimensions [B, C, H, W], got shape {tuple(pixel_values.shape)}{hint}")
    if not pixel_values.is_floating_point():
        raise InputError(f"pixel values must be floating point and normalised as the model expects "
                         f"(got {pixel_values.dtype}); use the model's image processor")
    b, c, h, w = pixel_values.shape
    if b == 0:
        raise InputError("empty batch")
    size, patch, channels = image_geometry(model, family)
    if c != channels:
        raise InputError(f"the model expects {channels} channels, got {c} (shape {tuple(pixel_values.shape)})")
    if (h, w) != tuple(size):
        raise InputError(f"the model expects {size[0]}x{size[1]} images, got {h}x{w}; "
                         f"resize them (the model's image processor does)")
    pixels = pixel_values.to(device=device, dtype=dtype)
    grid = (size[0] // patch[0], size[1] // patch[1])
    kwargs = {family.pixel_input: pixels}
    if family.prompts:
        kwargs.update(_prompts(model, inputs, device))
    return Prepared(kwargs, None, {"pixels": pixels, "grid": grid})


def _prompts(model, inputs: Any, device) -> dict[str, torch.Tensor]:
    """The text prompts every image is scored against (CLIP zero-shot): [P, L] ids and mask."""
    if not hasattr(inputs, "keys") or "input_ids" not in inputs:
        raise InputError(f"{type(model).__name__} scores images against text prompts: pass a mapping with "
                         "'pixel_values' [B, C, H, W] and the prompts' 'input_ids' (and 'attention_mask') [P, L], "
                         "e.g. processor(text=prompts, images=images, return_tensors='pt', padding=True)")
    ids, valid, _ = _text_parts(inputs)
    text_config = getattr(model.config, "text_config", model.config)
    vocab, limit = text_config.vocab_size, getattr(text_config, "max_position_embeddings", None)
    if (ids < 0).any() or (ids >= vocab).any():
        raise InputError(f"prompt input_ids outside the model's vocabulary (0..{vocab - 1}); "
                         "were the prompts tokenized with this model's tokenizer?")
    if limit is not None and ids.shape[1] > limit:
        raise InputError(f"prompts too long for the model: {ids.shape[1]} tokens, at most {limit}; "
                         "truncate them (tokenizer(..., truncation=True))")
    return {"input_ids": ids.to(device), "attention_mask": valid.to(device).long()}


def _text_parts(inputs: Any):
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not hasattr(inputs, "keys") or "input_ids" not in inputs:
        raise InputError("text models take the tokenizer's output: a mapping with 'input_ids' "
                         "(and 'attention_mask', optional 'token_type_ids'), or a LongTensor of ids")
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.dim() == 1:
        raise InputError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)} "
                         "(add a batch dimension, or tokenize a list of texts)")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise InputError(f"input_ids must be a non-empty integer tensor [batch, length], "
                         f"got shape {tuple(ids.shape)} dtype {ids.dtype}")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    extra = {}
    for name in ("token_type_ids", "position_ids"):      # position_ids: as generate() passes them
        value = inputs.get(name)
        if value is not None:
            value = torch.as_tensor(value)
            if value.shape != ids.shape:
                raise InputError(f"{name} shape {tuple(value.shape)} differs from input_ids {tuple(ids.shape)}")
            extra[name] = value
    return ids.long(), mask.bool(), extra


def text_batch_size(inputs: Any) -> int:
    return _text_parts(inputs)[0].shape[0]


def prepare_text(model, family: Family, inputs: Any, dtype: torch.dtype, device) -> Prepared:
    ids, valid, extra = _text_parts(inputs)
    ids, valid = ids.to(device), valid.to(device)
    vocab = model.get_input_embeddings().num_embeddings
    if (ids < 0).any() or (ids >= vocab).any():
        raise InputError(f"input_ids outside the model's vocabulary (0..{vocab - 1}); "
                         "was the text tokenized with this model's tokenizer?")
    empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"sample(s) {empty} have no real token (attention_mask is all 0)")
    if family.readout(model) != "last" and not valid[:, 0].all():
        raise InputError("the first token (the pooled [CLS]) is padding in some sample; "
                         "use right padding (the tokenizer's default for these models)")
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None:
        offset = 0
        if "roberta" in getattr(config, "model_type", "").lower():
            offset = (getattr(config, "pad_token_id", 1) or 0) + 1     # RoBERTa numbers tokens from pad + 1
        if ids.shape[1] + offset > limit:
            raise InputError(f"sequence too long for the model: {ids.shape[1]} tokens; truncate "
                             "(tokenizer(..., truncation=True)) or explain with windows "
                             "(relprop.text.explain_text(..., long_text='windows'))")
    kwargs = {"input_ids": ids, "attention_mask": valid.long()}
    kwargs.update({name: value.to(device).long() for name, value in extra.items()})
    if family.positions_from_mask and "position_ids" not in kwargs:
        kwargs["position_ids"] = (valid.long().cumsum(1) - 1).masked_fill(~valid, 1)
    return Prepared(kwargs, valid, {"attention_mask": valid, "input_ids": ids})


def prepare(model, family: Family, inputs: Any, dtype: torch.dtype, device) -> Prepared:
    """Check ``inputs`` and make the forward arguments (call outside inference mode: tensors
    made under ``torch.inference_mode`` are copied, autograd cannot use them)."""
    prepared = (prepare_images if family.modality == "image" else prepare_text)(model, family, inputs, dtype, device)
    prepared.kwargs = {k: v.clone() if v.is_inference() else v for k, v in prepared.kwargs.items()}
    if "pixels" in prepared.extras:
        prepared.extras["pixels"] = prepared.kwargs[family.pixel_input]
    return prepared


#: dims of each forward argument that may vary without a new export
DYNAMIC = {"pixel_values": (0,), "x": (0,), "input_ids": (0, 1), "attention_mask": (0, 1), "token_type_ids": (0, 1),
           "position_ids": (0, 1)}
