"""``relprop demo``: the bundled default models explaining real data, offline.

Images: the bundled ViT (trained by ``scripts/train_fmnist_vit.py``) on cluttered
Fashion-MNIST test canvases, one PNG per canvas (canvas | ground-truth item | the paper's
map for the predicted class | for a second class). Text: the bundled sentiment MiniLM on a
few sentences, as an HTML page and in the terminal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .loading import BUNDLED_MODELS, FASHION_VIT

FASHION_MODEL = BUNDLED_MODELS[FASHION_VIT].folder
SENTENCES = [
    "A gorgeous, witty and deeply moving film that never wastes a scene.",
    "The plot is thin, the jokes fall flat and the two hours feel like four.",
    "Not the masterpiece some critics claim, but the performances are terrific.",
]


def register(subparsers) -> None:
    from .cli import positive_int
    from .attributions import method_names

    parser = subparsers.add_parser("demo", help="explain real test images and sentences with the bundled models")
    parser.add_argument("--out", default="relprop-demo", help="output folder (default: relprop-demo)")
    parser.add_argument("--count", type=positive_int, default=8, help="number of test canvases (default 8)")
    parser.add_argument("--method", default="transformer_attribution", choices=method_names())
    parser.add_argument("--skip-text", action="store_true", help="images only")
    parser.set_defaults(run=run)


def run(args) -> int:
    from .files import output_dir

    out = output_dir(args.out)
    status = _images(out, args.count, args.method)
    if not args.skip_text:
        status = max(status, _sentences(out, args.method))
    return status


def _panel(explainer, pixels, display, target, method):
    from .visualize import overlay

    result = explainer.explain(pixels, method, target=target)
    return overlay(display, result.upsampled()[0].numpy())


def _images(out: Path, count: int, method: str) -> int:
    from transformers import ViTForImageClassification

    from .datasets import CLASS_NAMES, make_canvas
    from .errors import RelpropError
    from .explainer import Explainer
    from .visualize import save_png

    if not (FASHION_MODEL / "model.safetensors").exists():
        print("error: the bundled Fashion-MNIST model is missing (run scripts/train_fmnist_vit.py)", file=sys.stderr)
        return 1
    try:
        make_canvas("test", 0)
    except (FileNotFoundError, RelpropError, OSError) as error:
        print(f"error: Fashion-MNIST test data not found ({error}); install Debian's dataset-fashion-mnist "
              "or set RELPROP_FASHION_MNIST to its folder", file=sys.stderr)
        return 1
    model = ViTForImageClassification.from_pretrained(FASHION_MODEL).eval()
    explainer = Explainer(model)
    correct = 0
    for index in range(count):
        image, mask, label = make_canvas("test", index)
        pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        probs = explainer.logits(pixels).softmax(-1)[0]
        top2 = probs.topk(2).indices.tolist()
        correct += top2[0] == label
        truth = image.copy()
        truth[~mask] = (truth[~mask] * 0.3).astype(np.uint8)
        panels = [image, truth] + [_panel(explainer, pixels, image, cls, method) for cls in top2]
        strip = np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], axis=1)
        strip = np.kron(strip, np.ones((3, 3, 1), dtype=np.uint8))          # 3x larger for viewing
        name = f"canvas{index:03d}_true-{CLASS_NAMES[label]}_pred-{CLASS_NAMES[top2[0]]}.png".replace("/", "-")
        save_png(out / name.replace(" ", "_"), strip)
        print(f"canvas {index}: true {CLASS_NAMES[label]:<12} predicted {CLASS_NAMES[top2[0]]:<12} "
              f"(p={probs[top2[0]]:.2f}); second {CLASS_NAMES[top2[1]]} (p={probs[top2[1]]:.2f})")
    print(f"{correct}/{count} correct; panels: canvas | true item | {method} for the predicted class | "
          f"for the second class -> {out}/")
    return 0


def _sentences(out: Path, method: str) -> int:
    from .explainer import Explainer
    from .files import atomic_write_text
    from .text.explain import explain_text
    from .text.views import to_ansi, to_html

    try:
        from .text.pretrained import load_sentiment_model
        model, tokenizer = load_sentiment_model()
    except (ImportError, RuntimeError, OSError) as error:
        print(f"error: the bundled sentiment model could not be loaded: {error}", file=sys.stderr)
        return 1
    explanations = explain_text(Explainer(model), tokenizer, SENTENCES, method)
    for exp in explanations:
        print(to_ansi(exp) if sys.stdout.isatty() else
              f"{exp.label} (p={exp.probabilities[exp.target]:.2f}): "
              + ", ".join(w.text for w in sorted(exp.words, key=lambda w: -w.relevance)[:4]))
    atomic_write_text(out / "sentences.html", to_html(explanations))
    print(f"sentence explanations -> {out / 'sentences.html'}")
    return 0
