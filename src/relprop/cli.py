"""Command-line interface: ``relprop explain``, ``relprop explain-text``, ``relprop eval``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import RelpropError


def _explain_images(args) -> int:
    from tqdm import tqdm

    from .explainer import Explainer
    from .loading import ImagePreprocessor, load_image_classifier, read_image
    from .visualize import overlay, save_png

    model = load_image_classifier(args.model)
    explainer = Explainer(model)
    preprocess = ImagePreprocessor.for_model(args.model, model)
    labels = explainer.labels
    target = _parse_target(args.target, labels)
    out = Path(args.out)
    paths = [Path(p) for p in args.images]
    failures = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="explaining", unit="batch",
                      disable=len(paths) <= args.batch_size or None):
        batch_paths, images = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                images.append(read_image(path))
                batch_paths.append(path)
            except RelpropError as error:
                failures.append(str(error))
                print(f"error: {error}", file=sys.stderr)
        if not images:
            continue
        pixels = preprocess(images)
        display = preprocess.to_display(pixels)
        logits = explainer.logits(pixels)
        probs = logits.softmax(-1)
        k = min(args.top_k, probs.shape[1])
        top = probs.topk(k, dim=1)
        classes = [[target] for _ in batch_paths] if target is not None else top.indices.tolist()
        for rank in range(len(classes[0])):
            result = explainer.explain(pixels, args.method, target=[c[rank] for c in classes])
            maps = result.upsampled()
            for i, path in enumerate(batch_paths):
                cls = classes[i][rank]
                name = f"{path.stem}_{args.method}_class{cls}_{_safe(labels.get(cls, str(cls)))}"
                _save_npy(out / f"{name}.npy", result.as_grid()[i].cpu().numpy())
                save_png(out / f"{name}.png", overlay(display[i], maps[i]))
        for i, path in enumerate(batch_paths):
            shown = ", ".join(f"{labels.get(c, str(c))} ({p:.3f})" for p, c in
                              zip(top.values[i].tolist(), top.indices[i].tolist()))
            print(f"{path}: {shown}")
    print(f"wrote {args.method} maps to {out}/")
    return 1 if failures else 0


def _save_npy(path: Path, array: np.ndarray) -> None:
    from .files import atomic_write

    atomic_write(path, lambda handle: np.save(handle, array))


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:40]


def _parse_target(value: Optional[str], labels: dict[int, str]) -> Optional[int]:
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    by_name = {name.lower(): index for index, name in labels.items()}
    if value.lower() in by_name:
        return by_name[value.lower()]
    raise RelpropError(f"unknown class {value!r}; give an index or one of the model's labels "
                       f"({', '.join(list(labels.values())[:10])}{', ...' if len(labels) > 10 else ''})")


def build_parser() -> argparse.ArgumentParser:
    from .methods import method_names

    parser = argparse.ArgumentParser(prog="relprop", description="Explain Transformer classifiers "
                                     "(Chefer, Gur & Wolf, CVPR 2021, and its baselines).")
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser("explain", help="explain image classifications: PNG overlays + .npy maps")
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    explain.add_argument("--method", default="transformer_attribution", choices=method_names())
    group = explain.add_mutually_exclusive_group()
    group.add_argument("--target", help="class index or label name to explain (default: the prediction)")
    group.add_argument("--top-k", type=int, default=1, help="explain each of the K most likely classes")
    explain.add_argument("--out", default="relprop-out", help="output folder (default: relprop-out)")
    explain.add_argument("--batch-size", type=int, default=8)
    explain.set_defaults(run=_explain_images)
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Sub-commands living in optional modules (text, evaluation)."""
    found = []
    for module in ("relprop.text.cli", "relprop.eval.cli", "relprop.demo"):
        try:
            found.append(__import__(module, fromlist=["register"]).register)
        except ImportError:
            continue
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; every outcome is one line on stderr and an exit code, never a traceback:
    0 done, 1 failed while working, 2 usage error (argparse's too), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except RelpropError as error:
        print(f"relprop: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("relprop: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug in relprop: still one line, the traceback only on request
        if os.environ.get("RELPROP_DEBUG"):
            raise
        print(f"relprop: internal error: {type(error).__name__}: {error} "
              "(rerun with RELPROP_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
