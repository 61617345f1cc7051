"""What the explorer computes, as JSON-ready payloads: top-k classes, overlays (PNG data URLs),
word scores, the inside view (per-block A, ∇A, R_A, Ā) and the what-if curve.

Every function here runs with the model's lock held (see `app`); none keeps state between
calls except the image store (uploaded images by id, preprocessed once).
"""
from __future__ import annotations

import base64
import io
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError, TooLargeError
from .models import ServedModel

TOP_K = 5
#: image inputs are small (the bundled ViT sees 64x64): overlays are drawn at least this wide
DISPLAY_SIDE = 192
#: the side-by-side grid's default methods: the paper's, its strongest baselines and AttnLRP
DEFAULT_METHODS = ("transformer_attribution", "attnlrp", "rollout", "attn_gradcam", "partial_lrp", "grad_rollout")
INSIDE_FALLBACK = "transformer_attribution"
WHATIF_STEP = 5            # percent between the what-if curve's points
MAX_TEXT_CHARS = 5_000
MAX_NEW_TOKENS = 24


# ---------------------------------------------------------------------------------------- inputs
class _Upload(io.BytesIO):
    """The uploaded bytes, named in messages as "the upload" (not an object repr)."""

    def __str__(self) -> str:
        return "the upload"


def decode_image(data: bytes, max_pixels: int):
    """An RGB PIL image from uploaded bytes, refusing more than ``max_pixels`` pixels before
    any pixel is decoded (a decompression bomb is a small file of a huge image)."""
    from PIL import Image

    from ..loading import read_image

    if not data:
        raise InputError("the upload is empty: choose an image file")
    try:
        with Image.open(_Upload(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as error:     # Pillow's own limit (far above ours)
        raise TooLargeError(f"the image is refused as a possible decompression bomb ({error}); shrink it first") from None
    except (OSError, ValueError, EOFError, SyntaxError):
        raise InputError("the upload is not an image this server can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)") from None
    if width * height > max_pixels:
        raise TooLargeError(f"the image has {width} x {height} = {width * height:,} pixels, over this server's limit "
                            f"of {max_pixels:,} (refused as a possible decompression bomb); shrink it first")
    return read_image(_Upload(data), note=lambda message: None)


@dataclass
class StoredImage:
    model: str
    pixels: torch.Tensor        # [1, 3, H, W] as the model takes it
    unit: torch.Tensor          # [1, 3, H, W] the same image in [0, 1] (what the what-if test removes from)
    display: np.ndarray         # [H, W, 3] uint8, as the model saw it


class ImageStore:
    """Uploaded and picked images by a random id, the most recent ``capacity`` kept: the page
    sends the id, not the image, with every request."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: StoredImage) -> str:
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: Any, model: str) -> StoredImage:
        with self._lock:
            item = self._items.get(key) if isinstance(key, str) else None
            if item is not None:
                self._items.move_to_end(key)
        if item is None or item.model != model:
            raise InputError("this image is no longer on the server (or belongs to another model): upload or pick "
                             "it again")
        return item


def prepare_image(served: ServedModel, image) -> StoredImage:
    pixels = served.preprocess([image])
    preprocess = served.preprocess
    unit = pixels.detach().float()
    if preprocess.normalizes:
        unit = unit * torch.tensor(preprocess.std)[:, None, None] + torch.tensor(preprocess.mean)[:, None, None]
    return StoredImage(served.name, pixels, unit, preprocess.to_display(pixels)[0])


def check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError("type some text to explain")
    if len(text) > MAX_TEXT_CHARS:
        raise TooLargeError(f"the text has {len(text):,} characters, over this server's limit of {MAX_TEXT_CHARS:,}")
    return text


def text_inputs(served: ServedModel, text: str) -> dict:
    from ..text.explain import _max_length

    encoded = served.tokenizer(text, truncation=True, max_length=_max_length(served.model, served.tokenizer),
                               return_tensors="pt")
    return {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}


# ---------------------------------------------------------------------------------------- pictures
def png_data_url(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _scale(side: int) -> int:
    return max(1, math.ceil(DISPLAY_SIDE / side))


def enlarged(display: np.ndarray) -> np.ndarray:
    """The image as the model saw it, enlarged by whole pixels for viewing."""
    factor = _scale(display.shape[0])
    return np.kron(display, np.ones((factor, factor, 1), dtype=np.uint8))


def overlay_rgb(display: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """A map (patch grid [h, w] or pixels [H, W]) over the enlarged image, upsampled
    bilinearly as `Explanation.upsampled` does."""
    import torch.nn.functional as F

    from ..visualize import overlay

    big = enlarged(display)
    values = grid.detach().double()
    if tuple(values.shape) != big.shape[:2]:
        values = F.interpolate(values[None, None], size=big.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    return overlay(big, values.nan_to_num(0).numpy())


def matrix_rgb(matrix: torch.Tensor, side: int = 260) -> np.ndarray:
    """An N x N matrix as a heat map, enlarged: signed matrices (∇A, R_A) blue-white-red around 0,
    others (A, Ā) viridis from 0. The scale ends at the 99th percentile of the non-zero magnitudes,
    as a few large entries (the [CLS] column, the diagonal) would leave the rest one colour."""
    from matplotlib import colormaps

    values = matrix.detach().double().nan_to_num(0)
    magnitude = values.abs().flatten()
    nonzero = magnitude[magnitude > 0]
    peak = float(torch.quantile(nonzero, 0.99)) if nonzero.numel() else 1.0
    if bool((values < 0).any()):
        colours = colormaps["RdBu_r"](((values / peak).clamp(-1, 1) * 0.5 + 0.5).numpy())
    else:
        colours = colormaps["viridis"]((values / peak).clamp(0, 1).numpy())
    heat = (colours[..., :3] * 255).round().astype(np.uint8)
    factor = max(1, side // max(1, matrix.shape[0]))
    return np.kron(heat, np.ones((factor, factor, 1), dtype=np.uint8))


# ---------------------------------------------------------------------------------------- classes
def class_list(served: ServedModel, logits: torch.Tensor) -> list[dict]:
    probs = logits.double().softmax(-1)
    top = probs.topk(min(TOP_K, probs.shape[-1]))
    labels = served.labels
    return [{"index": int(i), "label": labels.get(int(i), str(int(i))), "probability": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


def _target(served: ServedModel, target: Any, logits: torch.Tensor) -> int:
    if target is None or target == "":
        return int(logits.argmax())
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < logits.shape[-1]:
        raise InputError(f"class must be an index in 0..{logits.shape[-1] - 1}, got {target!r}")
    return target


def check_methods(methods: Any) -> list[str]:
    from ..attributions import method_names

    known = method_names()
    if not isinstance(methods, list) or not methods:
        raise InputError("choose at least one method")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise InputError(f"unknown method {str(unknown[0])[:60]!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(methods))


def check_method(method: Any) -> str:
    return check_methods([method])[0]


# ---------------------------------------------------------------------------------------- explain
def explain_methods(served: ServedModel, inputs, target: int, methods: Sequence[str]) -> tuple[dict, float]:
    """Each method's explanation of ``inputs`` for class ``target``, computed together
    (`Explainer.explain_many`: the methods that read one pass share it), and the seconds taken."""
    start = time.perf_counter()
    results = served.explainer.explain_many(inputs, list(methods), target=target)
    return results, time.perf_counter() - start


def image_classes(served: ServedModel, stored: StoredImage) -> dict:
    logits = served.explainer.logits(stored.pixels)[0]
    return {"classes": class_list(served, logits), "image": png_data_url(enlarged(stored.display))}


def image_explain(served: ServedModel, stored: StoredImage, target: Any, methods: Sequence[str]) -> dict:
    logits = served.explainer.logits(stored.pixels)[0]
    chosen = _target(served, target, logits)
    results, seconds = explain_methods(served, stored.pixels, chosen, methods)
    maps = []
    for method, result in results.items():
        grid = result.as_grid()[0]
        maps.append({"method": method, "overlay": png_data_url(overlay_rgb(stored.display, grid)),
                     "grid": _rounded(grid), "finite": bool(torch.isfinite(grid).all()),
                     "flat": bool(grid.max() == grid.min())})
    return {"target": chosen, "label": served.labels.get(chosen, str(chosen)), "classes": class_list(served, logits),
            "maps": maps, "seconds": round(seconds, 4)}


def text_explain(served: ServedModel, text: str, target: Any, methods: Sequence[str]) -> dict:
    """The words of ``text`` scored by each method, as `relprop.text.explain_text` scores them
    (a word: the max of its sub-words), all methods from one `explain_many`."""
    from ..text.explain import _max_length, words_from_tokens

    tokenizer, limit = served.tokenizer, _max_length(served.model, served.tokenizer)
    encoded = tokenizer(text, truncation=True, max_length=limit, return_offsets_mapping=True,
                        return_special_tokens_mask=True, return_tensors="pt")
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
    logits = served.explainer.logits(inputs)[0]
    chosen = _target(served, target, logits)
    results, seconds = explain_methods(served, inputs, chosen, methods)
    offsets = encoded["offset_mapping"][0].numpy()
    special = encoded["special_tokens_mask"][0].numpy().astype(bool)
    word_ids = [None if s else w for w, s in zip(encoded.word_ids(0), special)]
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    truncated = max(0, len(tokenizer(text)["input_ids"]) - limit)
    maps = []
    for method, result in results.items():
        relevance = result.relevance[0].double().numpy()
        words = words_from_tokens(text, word_ids, offsets, relevance)
        maps.append({"method": method,
                     "words": [{"text": w.text, "start": w.start, "end": w.end, "relevance": _finite(w.relevance)}
                               for w in words],
                     "tokens": [{"token": t, "relevance": _finite(r), "special": bool(s)}
                                for t, r, s in zip(tokens, relevance, special)],
                     "truncated_tokens": truncated})
    return {"target": chosen, "label": served.labels.get(chosen, str(chosen)), "classes": class_list(served, logits),
            "text": text, "maps": maps, "seconds": round(seconds, 4)}


def generate_explain(served: ServedModel, prompt: str, method: str, max_new_tokens: Any) -> dict:
    from ..text.generate import explain_generation

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(f"new tokens must be a whole number in 1..{MAX_NEW_TOKENS}")
    start = time.perf_counter()
    result = explain_generation(served.explainer, served.tokenizer, prompt, max_new_tokens, method)
    payload = result.to_json()
    payload["seconds"] = round(time.perf_counter() - start, 4)
    return payload


def _finite(value: float) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def _rounded(values: torch.Tensor) -> list:
    array = values.detach().double().cpu().numpy()
    return [[_finite(v) for v in row] for row in array] if array.ndim == 2 else [_finite(v) for v in array]


# ---------------------------------------------------------------------------------------- inside
def inside_view(served: ServedModel, inputs, display: Optional[np.ndarray], target: int, method: str, block: Any,
                head: Any, row: Any) -> dict:
    """For one block: the chosen head's (or the head mean's) A, ∇A, R_A and Ā = max(0, ∇A ⊙ R_A),
    the chosen query row of each (over the tokens; for images also on the patch grid), and the
    whole Ā matrix, from ``explain(..., keep_internals=True)``."""
    note = None
    result = served.explainer.explain(inputs, method, target=target, keep_internals=True)
    if result.internals is None:          # AttnLRP / CP-LRP: one modified backward pass, no per-block tensors
        note = (f"{method} keeps no per-block A, ∇A, R_A (it is one modified backward pass); "
                f"showing {INSIDE_FALLBACK}'s")
        result = served.explainer.explain(inputs, INSIDE_FALLBACK, target=target, keep_internals=True)
    internals = result.internals
    assert internals is not None
    blocks = len(internals.attention)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < blocks:
        raise InputError(f"block must be in 0..{blocks - 1}, got {block!r}")
    attention = internals.attention[block][0]                     # [H, N, N]
    heads, tokens = attention.shape[0], attention.shape[-1]
    if head != "mean" and (isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads):
        raise InputError(f"head must be 'mean' or in 0..{heads - 1}, got {head!r}")
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < tokens:
        raise InputError(f"row must be a token index in 0..{tokens - 1}, got {row!r}")

    def pick(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None:
            return None
        tensor = tensor[0].double()
        return tensor.mean(0) if head == "mean" else tensor[head]

    grad = internals.attention_grad.get(block)
    relevance = internals.attention_relevance.get(block)
    contribution = None
    if grad is not None and relevance is not None:
        product = (grad[0].double() * relevance[0].double()).clamp(min=0)
        contribution = product.mean(0) if head == "mean" else product[head]
    panels: list[dict[str, Any]] = []
    for name, matrix in (("A", pick(attention[None])), ("∇A", pick(grad)), ("R_A", pick(relevance)),
                         ("Ā", contribution)):
        if matrix is None:
            panels.append({"name": name, "missing": f"{result.method} does not compute {name} for block {block}"})
            continue
        values = matrix[row]
        panel: dict[str, Any] = {"name": name, "row": [_finite(v) for v in values.tolist()], "matrix": png_data_url(matrix_rgb(matrix))}
        if display is not None and result.grid is not None:
            prefix = tokens - result.grid[0] * result.grid[1]
            if prefix >= 0:
                picture = overlay_rgb(display, values[prefix:].reshape(result.grid))
                if row >= prefix:
                    _outline(picture, divmod(row - prefix, result.grid[1]), result.grid)
                panel["overlay"] = png_data_url(picture)
        panels.append(panel)
    return {"method": result.method, "note": note, "block": block, "blocks": blocks, "head": head, "heads": heads,
            "row": row, "tokens": tokens, "grid": list(result.grid) if result.grid else None, "panels": panels}


def _outline(picture: np.ndarray, cell: tuple[int, int], grid: tuple[int, int]) -> None:
    """A white frame around patch ``cell`` (row, column of the grid): the row the panels show."""
    height, width = picture.shape[0] // grid[0], picture.shape[1] // grid[1]
    top, left = cell[0] * height, cell[1] * width
    box = picture[top:top + height, left:left + width]
    box[:2], box[-2:], box[:, :2], box[:, -2:] = 255, 255, 255, 255


def image_inside(served: ServedModel, stored: StoredImage, target: Any, method: str, block: Any, head: Any,
                 row: Any) -> dict:
    logits = served.explainer.logits(stored.pixels)[0]
    return inside_view(served, stored.pixels, stored.display, _target(served, target, logits), method, block, head, row)


def text_inside(served: ServedModel, text: str, target: Any, method: str, block: Any, head: Any, row: Any) -> dict:
    inputs = text_inputs(served, text)
    logits = served.explainer.logits(inputs)[0]
    payload = inside_view(served, inputs, None, _target(served, target, logits), method, block, head, row)
    payload["token_names"] = served.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    return payload


# ---------------------------------------------------------------------------------------- what-if
def _percent(percent: Any) -> int:
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 95:
        raise InputError(f"percent must be a whole number in 0..95, got {percent!r}")
    return percent


def _mode(mode: Any) -> bool:
    if mode not in ("top", "bottom"):
        raise InputError(f"mode must be 'top' or 'bottom', got {mode!r}")
    return mode == "bottom"


def _curve_point(served: ServedModel, percent: int, probs: torch.Tensor, target: int) -> dict:
    predicted = int(probs.argmax())
    return {"percent": percent, "predicted": predicted, "label": served.labels.get(predicted, str(predicted)),
            "probability": float(probs[predicted]), "target_probability": float(probs[target])}


def image_whatif(served: ServedModel, stored: StoredImage, target: Any, method: str, percent: Any, mode: Any) -> dict:
    """Remove the top (or bottom) ``percent`` % of patches by the map, as the paper's
    perturbation test does (`relprop.eval.perturbation`: patches ranked by the normalised map,
    removed pixels set to 0 in [0, 1] space), at every step of WHATIF_STEP % up to ``percent``."""
    from ..eval.images import Normalization
    from ..eval.perturbation import PerturbationConfig, ranking_scores, removal_masks

    percent, negative = _percent(percent), _mode(mode)
    logits = served.explainer.logits(stored.pixels)[0]
    chosen = _target(served, target, logits)
    preprocess = served.preprocess
    normalization = (Normalization(tuple(preprocess.mean), tuple(preprocess.std)) if preprocess.normalizes
                     else Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    size = tuple(stored.unit.shape[-2:])
    patch = getattr(served.model.config, "patch_size", None)
    config = PerturbationConfig(image_size=size, normalization=normalization, rank="patch" if patch else "pixel",
                                patch_size=patch if isinstance(patch, int) else None)
    result = served.explainer.explain(stored.pixels, method, target=chosen)
    scores = ranking_scores(result, config)
    steps = list(range(WHATIF_STEP, percent + 1, WHATIF_STEP))
    if percent and percent not in steps:
        steps.append(percent)
    curve = [_curve_point(served, 0, logits.double().softmax(-1), chosen)]
    shown = stored.unit[0]
    if steps:
        masks = removal_masks(scores, [s / 100 for s in steps], negative, size)[0]          # [S, H, W]
        perturbed = torch.where(masks[:, None], torch.zeros(()), stored.unit)               # [S, 3, H, W]
        probs = served.explainer.logits(normalization(perturbed)).double().softmax(-1)
        curve += [_curve_point(served, s, p, chosen) for s, p in zip(steps, probs)]
        shown = perturbed[-1]
    display = (shown.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return {"target": chosen, "label": served.labels.get(chosen, str(chosen)), "mode": mode, "percent": percent,
            "curve": curve, "image": png_data_url(enlarged(display))}


def text_whatif(served: ServedModel, text: str, target: Any, method: str, percent: Any, mode: Any) -> dict:
    """Delete the top (or bottom) ``percent`` % of the text's tokens (special tokens stay) by the
    map, at every step of WHATIF_STEP % up to ``percent``; the model reads what is left."""
    percent, negative = _percent(percent), _mode(mode)
    inputs = text_inputs(served, text)
    logits = served.explainer.logits(inputs)[0]
    chosen = _target(served, target, logits)
    result = served.explainer.explain(inputs, method, target=chosen)
    ids = inputs["input_ids"][0]
    special = torch.tensor(served.tokenizer.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True),
                           dtype=torch.bool)
    content = torch.nonzero(~special).flatten()
    ranking = result.relevance[0, content].double().nan_to_num(0)
    order = content[torch.argsort(ranking if negative else -ranking, stable=True)]
    steps = list(range(WHATIF_STEP, percent + 1, WHATIF_STEP))
    if percent and percent not in steps:
        steps.append(percent)
    curve = [_curve_point(served, 0, logits.double().softmax(-1), chosen)]
    kept_text = text
    for step in steps:
        removed = order[: int(len(content) * step / 100)]
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[removed] = False
        shortened = {k: v[:, keep] for k, v in inputs.items()}
        probs = served.explainer.logits(shortened)[0].double().softmax(-1)
        curve.append(_curve_point(served, step, probs, chosen))
        kept_text = served.tokenizer.decode(ids[keep].tolist(), skip_special_tokens=True)
    return {"target": chosen, "label": served.labels.get(chosen, str(chosen)), "mode": mode, "percent": percent,
            "curve": curve, "kept_text": kept_text}
