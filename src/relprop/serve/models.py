"""The models a `relprop serve` process offers: loaded once from the command line's list, each
with its own lock (an `Explainer` is not meant for two threads at once; two tabs asking the same
model wait for each other and each gets its own result)."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelLoadError, UnknownModelError, did_you_mean
from ..loading import BUNDLED_MODELS, bundled_model

BUNDLED = tuple(BUNDLED_MODELS)      # what the explorer serves by default


@dataclass
class ServedModel:
    """One model of the explorer: what it takes (``kind``), its explainer and preprocessing."""

    name: str                      # how the page names it: a bundled name, or a folder's last part
    kind: str                      # "image", "text" or "generate"
    model: Any
    explainer: Any
    tokenizer: Any = None
    preprocess: Any = None         # relprop.loading.ImagePreprocessor (images)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def labels(self) -> dict[int, str]:
        return {} if self.kind == "generate" else self.explainer.labels

    @property
    def image_size(self) -> Optional[tuple[int, int]]:
        if self.kind != "image":
            return None
        size = getattr(self.model.config, "image_size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    def describe(self) -> dict:
        """What the page needs to draw its controls (labels are model text: the page escapes them)."""
        blocks, heads = _blocks_and_heads(self.model.config)
        return {"name": self.name, "kind": self.kind, "labels": [self.labels.get(i, str(i)) for i in range(len(self.labels))],
                "blocks": blocks, "heads": heads, "image_size": self.image_size}


def _blocks_and_heads(config) -> tuple[int, int]:
    """Attention blocks and (the most) heads per block, for the page's slider and head selector
    (a hierarchical model such as Swin: stages of ``depths`` blocks with ``num_heads`` each)."""
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)):
        heads = getattr(config, "num_heads", None) or [0]
        return int(sum(depths)), int(max(heads) if isinstance(heads, (list, tuple)) else heads)
    blocks = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 0
    return int(blocks), int(heads)


def canonical(name: str) -> str:
    """A bundled model's own name for ``name`` (its underscore spelling too); a folder as given."""
    bundled = bundled_model(name)
    return bundled.name if bundled else name


def load_model(name: str) -> ServedModel:
    """A bundled model by name, or a local folder (its config.json says image classifier, text
    classifier or causal language model)."""
    from ..explainer import Explainer
    from ..loading import load_causal_lm, load_text_classifier

    bundled = bundled_model(name)
    if bundled is not None:
        name, kind = bundled.name, bundled.kind
    else:
        kind = _folder_kind(name)
    if kind == "image":
        return _image(name)
    model, tokenizer = (load_causal_lm if kind == "generate" else load_text_classifier)(name)
    return ServedModel(name, kind, model, Explainer(model), tokenizer)


def _folder_kind(name: str) -> str:
    """The kind of the model in folder ``name`` (a key of `relprop.loading.KINDS`), from its config.json."""
    folder = Path(name).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"--model {name!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a folder with "
                             f"a config.json")
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or [""]
    except (OSError, ValueError, AttributeError) as error:
        raise ModelLoadError(f"cannot read {config_file}: {error}") from None
    if architectures[0].endswith("ForImageClassification"):
        return "image"
    return "generate" if architectures[0].endswith(("ForCausalLM", "LMHeadModel")) else "text"


def _image(name: str) -> ServedModel:
    from ..explainer import Explainer
    from ..loading import ImagePreprocessor, load_image_classifier

    model = load_image_classifier(name)
    preprocess = ImagePreprocessor.for_model(name, model, note=lambda message: None)
    return ServedModel(name, "image", model, Explainer(model), preprocess=preprocess)


class ModelSet:
    """The served models by name; asking for any other name is an `UnknownModelError` (the page
    can never make the server load a path)."""

    def __init__(self, models: list[ServedModel]):
        self.models: dict[str, ServedModel] = {}
        for model in models:          # a folder is named by its last part (the page never sees a path)
            base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.name).name).strip("._") or "model"
            name, number = base, 1
            while name in self.models:
                number += 1
                name = f"{base}-{number}"
            model.name = name
            self.models[name] = model

    @classmethod
    def load(cls, names: list[str]) -> "ModelSet":
        unique = list(dict.fromkeys(canonical(n) for n in names))
        return cls([load_model(name) for name in unique])

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise UnknownModelError(f"no model {name!r} is served here.{did_you_mean(name, self.models)} "
                                    f"Served: {', '.join(self.models)}")
        return model

    def warm_up(self) -> None:
        """Export each model's graph and run each default method once, so that the first click
        does not pay for it (the explainer caches the export per input signature, and the colour
        maps load once)."""
        import torch

        from ..visualize import heatmap_rgb
        from .views import DEFAULT_METHODS

        heatmap_rgb(torch.zeros(2, 2))          # imports matplotlib's colour maps (a second, once)
        for served in self.models.values():
            with served.lock:
                if served.kind == "image":
                    size = served.image_size or (224, 224)
                    inputs: Any = torch.zeros(1, 3, *size)
                else:
                    inputs = dict(served.tokenizer("a warm up", return_tensors="pt"))
                    inputs.pop("token_type_ids", None) if served.kind == "generate" else None
                methods = ("attnlrp",) if served.kind == "generate" else DEFAULT_METHODS
                for method in methods:
                    served.explainer.explain(inputs, method, target=0)
