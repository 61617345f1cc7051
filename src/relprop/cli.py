"""Command-line interface: ``relprop explain``, ``relprop explain-text``, ``relprop eval``."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import RelpropError, RunFailure

# Sub-commands living in modules that may need optional packages
EXTENSIONS = ("relprop.text.cli", "relprop.eval.cli", "relprop.demo", "relprop.uses_cli", "relprop.serve.cli")
MANIFEST = "relprop-outputs.json"


def positive_int(text: str) -> int:
    """argparse ``type=`` for every count and size option (``--top-k``, ``--batch-size``,
    ``--limit``, ...): an integer >= 1, else a usage error naming the value (0 or less would do
    nothing, or silently drop samples, as ``--limit -3`` once did)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def replacement_value(text: str) -> float | str:
    """argparse ``type=`` for ``--replace`` (``relprop counterfactual``, ``eval perturbation``,
    ``eval counterfactual``): what removed pixels become, a number in [0, 1] image space
    (before normalisation) or ``"blur"`` (a blurred copy of the image); anything else, NaN and
    infinities included (no removal a model can see), is a usage error naming the value."""
    if text == "blur":
        return text
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 <= number <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (image space) or 'blur', got {text!r}")
    return number


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) that points to --help instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@dataclass
class _Input:
    given: str      # as typed, for messages
    source: Path    # resolved, for identity
    label: str      # output-name prefix


def _inputs(given: Sequence[str]) -> list[_Input]:
    """One entry per distinct file (the same file named twice is one input), each with its own
    output-name prefix."""
    unique: dict[Path, str] = {}
    for name in given:
        source = Path(name).expanduser().resolve()
        if source in unique:
            _note(f"{name} is the same file as {unique[source]}; explained once")
        unique.setdefault(source, name)
    sources = list(unique)
    return [_Input(unique[source], source, label) for source, label in zip(sources, output_labels(sources))]


def output_labels(paths: Sequence[Path]) -> list[str]:
    """Readable, distinct output-name prefixes for distinct resolved paths, fixed by the set of paths:
    the stem when no other path shares it, else the file name, else parent folders joined in front
    (``a_img.png``) until distinct; compared case-insensitively, as macOS and Windows file systems do."""
    def label(path: Path, level: int) -> str:
        return path.stem if level == 0 else "_".join(path.parts[-level:])

    levels = [0] * len(paths)
    while True:
        groups = defaultdict(list)
        for i, path in enumerate(paths):
            groups[label(path, levels[i]).casefold()].append(i)
        deeper = [i for group in groups.values() if len(group) > 1 for i in group
                  if levels[i] < len(paths[i].parts) - 1]          # parts[0] is the root
        if not deeper:
            break
        for i in deeper:
            levels[i] += 1
    labels = [label(path, level) for path, level in zip(paths, levels)]
    for group in groups.values():          # same up to case at every level: number them
        if len(group) > 1:
            for rank, i in enumerate(sorted(group, key=lambda i: str(paths[i])), 1):
                labels[i] = f"{labels[i]}-{rank}"
    return labels


class _Manifest:
    """``relprop-outputs.json`` in the output folder: which input, method and class each output
    file holds, so a rerun replaces its own files and never another input's (or a stranger's)."""

    def __init__(self, folder: Path):
        self.path = folder / MANIFEST
        self.outputs: dict[str, dict] = {}
        self.claimed: set[str] = set()        # names this run will write
        if self.path.exists():
            try:
                self.outputs = dict(json.loads(self.path.read_text(encoding="utf-8"))["outputs"])
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
                _note(f"ignoring unreadable {self.path} ({error}); files already in the folder count as not "
                      "written by relprop")

    def claim(self, source: Path, names: Sequence[str], method: str, classes: Sequence[int],
              labels: dict[int, str], overwrite: bool) -> Optional[str]:
        """Record that ``source``'s maps go to ``names`` (.npy and .png, one per class), or, unless
        ``overwrite``, say why that would replace another input's (or a stranger's) file."""
        files = [name + ext for name in names for ext in (".npy", ".png")]
        problem = None if overwrite else self._conflict(files, source)
        if problem:
            return problem
        self.claimed.update(files)
        for name, cls in zip(names, classes):
            for ext in (".npy", ".png"):
                self.outputs[name + ext] = {"source": str(source), "method": method, "class": cls,
                                            "class_label": labels.get(cls, str(cls))}
        return None

    def _conflict(self, files: Sequence[str], source: Path) -> Optional[str]:
        folder = self.path.parent
        for name in files:
            if not (folder / name).exists() and name not in self.claimed:
                continue
            entry = self.outputs.get(name)
            owner = entry.get("source") if isinstance(entry, dict) else None
            if owner != str(source):
                held = f"holds the output for {owner}" if owner else f"was not written by relprop (not in {MANIFEST})"
                return (f"{folder / name} already exists and {held}; pass --overwrite to replace it, "
                        "or choose another --out")
        return None

    def save(self) -> None:
        from .files import atomic_write_text

        atomic_write_text(self.path, json.dumps({"outputs": dict(sorted(self.outputs.items()))}, indent=1) + "\n")


def _explain_images(args) -> int:
    import torch
    from tqdm import tqdm

    from .explainer import Explainer
    from .files import output_dir
    from .loading import ImagePreprocessor, load_image_classifier, read_image
    from .visualize import overlay, save_png

    inputs = _inputs(args.images)
    model = load_image_classifier(args.model)
    explainer = Explainer(model)
    preprocess = ImagePreprocessor.for_model(args.model, model, note=_note)
    labels = explainer.labels
    target = _parse_target(args.target, labels)
    out = output_dir(args.out)         # created only once the model is known to load
    manifest = _Manifest(out)
    failed = []

    def fail(item: _Input, message: str) -> None:
        failed.append(item.given)
        print(f"error: {message}", file=sys.stderr)

    for start in tqdm(range(0, len(inputs), args.batch_size), desc="explaining", unit="batch",
                      disable=len(inputs) <= args.batch_size or None):
        batch, images = [], []
        for item in inputs[start:start + args.batch_size]:
            try:
                images.append(read_image(Path(item.given).expanduser(), note=_note))
                batch.append(item)
            except RelpropError as error:
                fail(item, str(error))
        if not images:
            continue
        pixels = preprocess(images)
        probs = explainer.logits(pixels).softmax(-1)
        top = probs.topk(min(args.top_k, probs.shape[1]), dim=1)
        classes = [[target] for _ in batch] if target is not None else top.indices.tolist()
        names = [[_output_name(item, args.method, cls, labels) for cls in row] for item, row in zip(batch, classes)]
        keep = []
        for i, item in enumerate(batch):
            problem = manifest.claim(item.source, names[i], args.method, classes[i], labels, args.overwrite)
            if problem:
                fail(item, f"{item.given}: {problem}")
            else:
                keep.append(i)
        if not keep:
            continue
        manifest.save()                    # claimed before writing: a crash leaves no unowned file
        kept = torch.tensor(keep)
        display = preprocess.to_display(pixels[kept])
        unwritable = set()
        for rank in range(len(classes[0])):
            result = explainer.explain(pixels[kept], args.method, target=[classes[i][rank] for i in keep])
            grids, maps = result.as_grid().cpu().numpy(), result.upsampled()
            for row, i in enumerate(keep):
                try:
                    _save_npy(out / f"{names[i][rank]}.npy", grids[row])
                    save_png(out / f"{names[i][rank]}.png", overlay(display[row], maps[row]))
                except OSError as error:  # e.g. a folder under that name, a full disk
                    if i not in unwritable:
                        unwritable.add(i)
                        fail(batch[i], f"{batch[i].given}: cannot write {out / names[i][rank]}.*: "
                                       f"{error.strerror or error}")
        for i in keep:
            if i in unwritable:
                continue
            shown = ", ".join(f"{labels.get(c, str(c))} ({p:.3f})" for p, c in
                              zip(top.values[i].tolist(), top.indices[i].tolist()))
            print(f"{batch[i].given}: {shown} -> {out / batch[i].label}_{args.method}_class*.png/.npy")
    done = len(inputs) - len(failed)
    print(f"wrote {args.method} maps for {done} of {len(inputs)} input{'s' * (len(inputs) != 1)} to {out}/")
    if failed:
        listed = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise RunFailure(f"{len(failed)} of {len(inputs)} inputs failed (see the errors above): {listed}")
    return 0


def _output_name(item: _Input, method: str, cls: int, labels: dict[int, str]) -> str:
    """File name (without .png / .npy) of ``item``'s ``method`` map for class ``cls``."""
    return f"{item.label}_{method}_class{cls}_{_safe(labels.get(cls, str(cls)))}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    from .files import atomic_write

    atomic_write(path, lambda handle: np.save(handle, array))


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:40]


def _parse_target(value: Optional[str], labels: dict[int, str]) -> Optional[int]:
    """``--target``: a class index, or a label name matched as the library matches it."""
    from .explainer import label_index

    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    return label_index(value, labels)


def build_parser() -> argparse.ArgumentParser:
    from .attributions import method_names
    from .loading import bundled_models_help, model_help

    parser = ArgumentParser(prog="relprop", description="Explain Transformer classifiers "
                            "(Chefer, Gur & Wolf, CVPR 2021, and its baselines).", epilog=bundled_models_help())
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser("explain", help="explain image classifications: PNG overlays + .npy maps")
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--model", required=True, help=model_help("image"))
    explain.add_argument("--method", default="transformer_attribution", choices=method_names())
    group = explain.add_mutually_exclusive_group()
    group.add_argument("--target", help="class index or label name to explain (default: the prediction)")
    group.add_argument("--top-k", type=positive_int, default=1, help="explain each of the K most likely classes")
    explain.add_argument("--out", default="relprop-out", help="output folder (default: relprop-out)")
    explain.add_argument("--overwrite", action="store_true",
                         help=f"replace output files that hold another input's map or were not written by "
                              f"relprop (the folder's {MANIFEST} says which input each file holds)")
    explain.add_argument("--batch-size", type=positive_int, default=8, help="images per pass (default 8)")
    explain.set_defaults(run=_explain_images)
    registers, missing = _extensions()
    for register in registers:
        register(sub)
    if missing:
        parser.epilog = f"{bundled_models_help()}. Not available here: " + "; ".join(
            f"the commands of {module} (it needs the missing package {package!r}: pip install it)"
            for module, package in missing)
    return parser


def _extensions():
    """The ``register`` functions of `EXTENSIONS`, and (module, package) for each one hidden
    because an optional third-party package is missing. An ImportError inside relprop itself is
    a bug and propagates."""
    found, missing = [], []
    for module in EXTENSIONS:
        try:
            found.append(importlib.import_module(module).register)
        except ImportError as error:
            if not error.name or error.name.partition(".")[0] == "relprop":
                raise
            missing.append((module, error.name.partition(".")[0]))
    return found, missing


def _quiet_transformers() -> None:
    """No weight-loading progress bars on stderr: there, the user reads relprop's own lines."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; every outcome is one line on stderr and an exit code, never a traceback:
    0 done, 1 failed while working, 2 usage error (argparse's too), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: relaunched by `eval --launcher`
        _quiet_transformers()
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
        print(f"relprop: internal error: {type(error).__name__}: {''.join(str(error).splitlines()[:1])} "
              "(rerun with RELPROP_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
