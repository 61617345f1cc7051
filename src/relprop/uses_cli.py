"""``relprop localize`` and ``relprop counterfactual``: the paper's downstream uses of a map,
weak localisation (mask and box) and counterfactuals (what to remove to change the decision).

Outputs (in ``--out``, default ``relprop-out``):

* localize: per image ``<name>_<method>_class<C>_<label>_localize.png`` (the map | the image
  with the mask tinted and the box drawn) and ``.json`` beside it (class, box, mask size).
* counterfactual, images: per image ``<name>_<method>_class<C>_<label>_counterfactual.png``
  (original | with the removed patches | probabilities before and after) and ``.json``.
* counterfactual, text (``--text``): the sentence with the removed words struck out and the
  counterfactual in words on stdout; ``counterfactual.json`` with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import RelpropError, RunFailure, UsageError
from .loading import SENTIMENT, model_help

BOX_COLOUR = (255, 0, 0)
MASK_COLOUR = np.array([0, 200, 255])
REMOVED_COLOUR = (255, 0, 255)
MIN_PANEL = 256          # small model inputs (64x64) are scaled up (nearest) to at least this size


def register(subparsers: Any) -> None:
    from .attributions import method_names
    from .cli import positive_int, replacement_value

    loc = subparsers.add_parser("localize", help="weak localisation: a mask and a bounding box from the map",
                                description="Threshold each image's map (mean: the paper's segmentation rule; "
                                            "otsu; mass:P, the smallest region holding P%% of the positive "
                                            "relevance) and box the mask's largest connected component.")
    loc.add_argument("images", nargs="+", help="image files")
    loc.add_argument("--model", required=True, help=model_help("image"))
    loc.add_argument("--method", default="transformer_attribution", choices=method_names())
    loc.add_argument("--target", help="class index or label name to localise (default: the prediction)")
    loc.add_argument("--threshold", default="mean", type=_threshold, metavar="mean|otsu|mass:P",
                     help="map -> mask rule (default mean)")
    loc.add_argument("--box", choices=["largest", "tight"], default="largest",
                     help="box the mask's largest 8-connected component (default) or all of it")
    loc.add_argument("--out", default="relprop-out", help="output folder (default: relprop-out)")
    loc.set_defaults(run=run_localize)

    cf = subparsers.add_parser("counterfactual", help="the fewest patches / words whose removal changes the decision",
                               description="Remove patches (images) or words (--text) in the order of the map, "
                                           "most relevant first, until the prediction leaves the explained class "
                                           "(or --to CLASS wins), then restore every removed unit that is not "
                                           "needed.")
    cf.add_argument("images", nargs="*", default=[], help="image files")
    cf.add_argument("--text", action="append", help="a text to explain instead of images (repeat for several)")
    cf.add_argument("--model", help=f"{model_help('image', 'text')} (images: required; --text: default "
                                    f"{SENTIMENT})")
    cf.add_argument("--method", default="transformer_attribution", choices=method_names())
    cf.add_argument("--target", help="class to flip away from (default: the prediction)")
    cf.add_argument("--to", help="class that must win instead (default: any other class)")
    cf.add_argument("--replace", type=replacement_value, default=0.0,
                    help="images: value of removed pixels in [0, 1] image space (default 0), or 'blur'")
    cf.add_argument("--no-prune", action="store_true", help="keep the greedy prefix (skip the pruning step)")
    cf.add_argument("--batch-size", type=positive_int, default=64, help="candidate inputs per forward (default 64)")
    cf.add_argument("--out", help="output folder (images: default relprop-out; text: JSON only when given)")
    cf.set_defaults(run=run_counterfactual)


def _threshold(text: str) -> str:
    from .localize import parse_threshold

    try:
        parse_threshold(text)
    except RelpropError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _load_images(args, paths: Sequence[str]):
    """(explainer, preprocess, [(input, pixel_values [1, 3, H, W])], failures) for the image commands."""
    from .cli import _inputs
    from .explainer import Explainer
    from .loading import ImagePreprocessor, load_image_classifier, read_image

    model = load_image_classifier(args.model)
    explainer = Explainer(model)
    preprocess = ImagePreprocessor.for_model(args.model, model, note=_note)
    loaded, failed = [], []
    for item in _inputs(paths):
        try:
            loaded.append((item, preprocess([read_image(Path(item.given).expanduser(), note=_note)])))
        except RelpropError as error:
            print(f"error: {error}", file=sys.stderr)
            failed.append(item.given)
    return explainer, preprocess, loaded, failed


def _finish(done: int, failed: list[str]) -> int:
    total = done + len(failed)
    if failed:
        listed = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise RunFailure(f"{len(failed)} of {total} inputs failed (see the errors above): {listed}")
    return 0


def _scaled(rgb: np.ndarray) -> np.ndarray:
    factor = max(1, -(-MIN_PANEL // max(rgb.shape[:2])))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def _label(labels: dict, cls: Optional[int]) -> str:
    return "-" if cls is None else labels.get(cls, str(cls))


# ------------------------------------------------------------------ localize
def localization_panel(display: np.ndarray, relevance_map: np.ndarray, mask: np.ndarray,
                       box: Optional[tuple[int, int, int, int]]) -> np.ndarray:
    """[H, 2W(+gap), 3] uint8: the map over the image | the image with the mask tinted and the box."""
    from PIL import Image, ImageDraw

    from .visualize import overlay

    tinted = display.astype(np.float64)
    tinted[mask] = 0.55 * tinted[mask] + 0.45 * MASK_COLOUR
    left, right = _scaled(overlay(display, relevance_map)), _scaled(tinted.round().astype(np.uint8))
    factor = right.shape[0] // display.shape[0]
    canvas = Image.fromarray(right)
    if box is not None:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(canvas).rectangle([x0 * factor, y0 * factor, x1 * factor - 1, y1 * factor - 1],
                                         outline=BOX_COLOUR, width=max(2, factor // 2))
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([left, gap, np.array(canvas)], axis=1)


def run_localize(args) -> int:
    from .cli import _output_name, _parse_target
    from .files import output_dir
    from .localize import localize

    out = output_dir(args.out)
    explainer, preprocess, loaded, failed = _load_images(args, args.images)
    labels = explainer.labels
    target = _parse_target(args.target, labels)
    done = 0
    for item, pixels in loaded:
        result = explainer.explain(pixels, args.method, target=target)
        relevance = result.upsampled()[0].detach().float().cpu()
        found = localize(relevance, args.threshold, args.box)
        display = preprocess.to_display(pixels)[0]
        cls = int(result.target[0])
        name = _output_name(item, args.method, cls, labels) + "_localize"
        probability = float(result.logits[0].double().softmax(-1)[cls])
        entry = {"image": item.given, "png": f"{name}.png", "method": args.method, "class": cls,
                 "class_label": _label(labels, cls), "probability": probability,
                 "image_size": list(display.shape[:2]), **found.to_json()}
        if not _write(out, name, localization_panel(display, relevance.numpy(), found.mask, found.box), entry, item,
                      failed):
            continue
        done += 1
        where = "nothing (empty mask)" if found.box is None else f"box {list(found.box)}"
        print(f"{item.given}: {_label(labels, cls)} ({probability:.3f}) -> {where}, "
              f"{100 * found.mask.mean():.1f}% of the image -> {out / name}.png/.json")
    return _finish(done, failed)


def _write(out: Path, name: str, rgb: np.ndarray, entry: dict, item: Any, failed: list[str]) -> bool:
    """``name``.png and ``name``.json in ``out``; an unwritable one is reported and counted as failed."""
    from .files import atomic_write_text
    from .visualize import save_png

    try:
        save_png(out / f"{name}.png", rgb)
        atomic_write_text(out / f"{name}.json", json.dumps(entry, indent=1) + "\n")
    except OSError as error:
        print(f"error: {item.given}: cannot write {out / name}.*: {error.strerror or error}", file=sys.stderr)
        failed.append(item.given)
        return False
    return True


# ------------------------------------------------------------ counterfactual
def counterfactual_panel(display: np.ndarray, shown: np.ndarray, removed: np.ndarray, search: Any,
                         labels: dict) -> np.ndarray:
    """original | the input with the removed patches (outlined) | top probabilities before and after."""
    from .eval.report import new_figure

    fig = new_figure((11, 3.6))
    axes = [fig.add_subplot(1, 3, k) for k in (1, 2, 3)]
    before = search.original_probabilities
    axes[0].imshow(display, interpolation="nearest")
    axes[0].set_title(f"original: {_label(labels, search.original_class)} ({before[search.original_class]:.2f})",
                      fontsize=9)
    axes[1].imshow(shown, interpolation="nearest")
    if removed.any():
        axes[1].contour(removed.astype(float), levels=[0.5], colors=[np.array(REMOVED_COLOUR) / 255], linewidths=1.2)
    share = (f"{len(search.removed)} of {search.n_units} patches removed" if search.flipped
             else f"no flip (shown: all {search.n_units} patches removed)")
    axes[1].set_title(share, fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    after = search.new_probabilities
    classes = sorted(range(len(before)), key=lambda c: -max(before[c], after[c]))[:5]
    y = np.arange(len(classes))
    axes[2].barh(y - 0.2, [before[c] for c in classes], 0.4, label="before", color="tab:grey")
    axes[2].barh(y + 0.2, [after[c] for c in classes], 0.4, label="after", color="tab:red")
    axes[2].set_yticks(y)
    axes[2].set_yticklabels([_label(labels, c) for c in classes], fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set_xlim(0, 1)
    axes[2].legend(fontsize=8, loc="lower right")
    axes[2].set_title(f"now: {_label(labels, search.new_class)} ({after[search.new_class]:.2f})", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def run_counterfactual(args) -> int:
    if bool(args.text) == bool(args.images):
        raise UsageError("give image files or --text, not both" if args.text else "give image files or --text")
    if args.text:
        if args.replace != 0.0:
            raise UsageError("--replace is for images; a removed word is deleted from the text")
        return _counterfactual_texts(args)
    if not args.model:
        raise UsageError(f"images need --model ({model_help('image')})")
    return _counterfactual_images(args)


def _class(value: Optional[str], labels: dict) -> Optional[int]:
    from .cli import _parse_target

    return _parse_target(value, labels)


def _counterfactual_images(args) -> int:
    import torch

    from .cli import _output_name
    from .counterfactual import image_counterfactuals
    from .eval.images import Normalization, blurred
    from .files import output_dir

    out = output_dir(args.out or "relprop-out")
    explainer, preprocess, loaded, failed = _load_images(args, args.images)
    labels = explainer.labels
    target, to = _class(args.target, labels), _class(args.to, labels)
    mean = preprocess.mean if preprocess.normalizes else [0.0, 0.0, 0.0]
    std = preprocess.std if preprocess.normalizes else [1.0, 1.0, 1.0]
    normalization = Normalization(tuple(mean), tuple(std))
    done = 0
    for item, pixels in loaded:
        images = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]   # [0, 1] space
        replacement: Any = args.replace
        if args.replace == "blur":
            from PIL import Image

            display = preprocess.to_display(pixels)[0]
            replacement = torch.from_numpy(np.array(blurred(Image.fromarray(display)))).permute(2, 0, 1)[None] / 255
        [cf] = image_counterfactuals(explainer, images, normalization, args.method, target=target, to=to,
                                     replacement=replacement, batch_size=args.batch_size, prune=not args.no_prune)
        size = tuple(images.shape[-2:])
        removed = cf.removed_mask(size) if cf.search.flipped else np.ones(size, dtype=bool)   # "after" = all removed
        fill = torch.as_tensor(replacement, dtype=images.dtype).expand_as(images)
        shown_pixels = torch.where(torch.from_numpy(removed), fill, images)
        display, shown = preprocess.to_display(pixels)[0], _to_uint8(shown_pixels[0])
        s = cf.search
        name = _output_name(item, args.method, s.original_class, labels) + "_counterfactual"
        entry = {"image": item.given, "png": f"{name}.png", "method": args.method, "grid": list(cf.grid),
                 "removed_patches": [[u // cf.grid[1], u % cf.grid[1]] for u in s.removed],
                 "original_label": _label(labels, s.original_class), "new_label": _label(labels, s.new_class),
                 **s.to_json()}
        if not _write(out, name, counterfactual_panel(display, shown, removed, s, labels), entry, item, failed):
            continue
        done += 1
        if s.flipped:
            said = (f"removing {len(s.removed)} of {s.n_units} patches (greedy: {s.greedy}) turns "
                    f"{_label(labels, s.original_class)} ({s.original_probabilities[s.original_class]:.3f}) into "
                    f"{_label(labels, s.new_class)} ({s.new_probabilities[s.new_class]:.3f})")
        else:
            goal = f"makes {_label(labels, to)} win" if to is not None else f"changes {_label(labels, s.original_class)}"
            said = (f"no counterfactual: no prefix of the {s.n_units} patches in map order {goal} (with all "
                    f"removed: {_label(labels, s.new_class)})")
        print(f"{item.given}: {said} -> {out / name}.png/.json")
    return _finish(done, failed)


def _to_uint8(image) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _counterfactual_texts(args) -> int:
    from .counterfactual import text_counterfactuals
    from .explainer import Explainer
    from .files import atomic_write_text, output_dir
    from .loading import load_text_classifier

    texts = [t for t in args.text]
    if not all(t.strip() for t in texts):
        raise UsageError("--text is empty")
    out = output_dir(args.out) if args.out else None
    model, tokenizer = load_text_classifier(args.model or SENTIMENT)
    explainer = Explainer(model)
    labels = explainer.labels
    found = text_counterfactuals(explainer, tokenizer, texts, args.method, target=_class(args.target, labels),
                                 to=_class(args.to, labels), batch_size=args.batch_size, prune=not args.no_prune)
    style = "ansi" if sys.stdout.isatty() else "plain"
    for cf in found:
        print(cf.struck(style))
        print(cf.sentence())
    if out is not None:
        atomic_write_text(out / "counterfactual.json",
                          json.dumps({"counterfactuals": [cf.to_json() for cf in found]}, indent=1) + "\n")
        print(f"wrote {out / 'counterfactual.json'}")
    return 0
