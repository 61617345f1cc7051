"""Load a model (a bundled name, a local folder or a Hub id) and its preprocessing, offline-safe.

Every command's ``--model`` goes through the loaders here, so the bundled names (`BUNDLED_MODELS`)
mean the same in all of them: `bundled_model` is the one resolver of those names."""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

import numpy as np
import torch

from .errors import InputError, ModelLoadError, UsageError, did_you_mean

DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULTS_NOTE = ("using the ViT defaults (resize to the model's input size, scale to [0, 1], "
                 "mean = std = 0.5)")

# What each loader needs, and the command that explains the other kind (for "wrong kind" errors).
_KINDS = {
    "AutoModelForImageClassification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "an image classifier",
                                         "relprop explain IMAGE --model {name}"),
    "AutoModelForSequenceClassification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "a text classifier",
                                           "relprop explain-text TEXT --model {name}"),
    "AutoModelForCausalLM": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal language model",
                             "relprop explain-text PROMPT --model {name} --generate N"),
}
# The kinds of model a command takes (the explorer's kinds): what each is, and the commands that take it
KINDS = {
    "image": ("an image classifier", "relprop explain, localize, counterfactual IMAGE, eval perturbation, "
                                     "segmentation, class-specificity, localization, counterfactual --format "
                                     "fashion, and serve"),
    "text": ("a text classifier", "relprop explain-text TEXT, counterfactual --text, eval counterfactual "
                                  "--format sst2, and serve"),
    "generate": ("a causal language model", "relprop explain-text PROMPT --generate N, and serve"),
}
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside relprop, loaded offline by ``--model NAME`` in every command that
    takes its kind (its underscore spelling, e.g. ``fmnist_vit``, names it too).

    Parameters
    ----------
    name : str
        The name ``--model`` takes.
    kind : str
        ``"image"`` (image classifier), ``"text"`` (text classifier) or ``"generate"`` (causal
        language model): the keys of `KINDS`.
    folder : pathlib.Path
        Its files, under relprop/assets.
    about : str
        What it is, in a few words (for ``relprop --help``).
    """

    name: str
    kind: str
    folder: Path
    about: str


FASHION_VIT, SENTIMENT, TINY_LM = "fmnist-vit", "minilm-sst2", "tiny-lm"
BUNDLED_MODELS = {model.name: model for model in (
    BundledModel(FASHION_VIT, "image", ASSETS / "fmnist_vit", "a small ViT for cluttered Fashion-MNIST canvases"),
    BundledModel(SENTIMENT, "text", ASSETS / "minilm_sst2", "MiniLM fine-tuned on SST-2 sentiment"),
    BundledModel(TINY_LM, "generate", ASSETS / "tiny_lm", "a tiny Llama trained on movie reviews"),
)}
# How close an unknown bare name must be to a bundled one to be refused as its typo (without asking
# the Hub): close enough for "fmnist-vt" or "tiny_lm2", not for Hub ids such as "distilgpt2"
_TYPO_CUTOFF = 0.75
# Plain words, digits and punctuation: a tokenizer that maps all of them to its unknown token
# has no real vocabulary (e.g. the empty one transformers 5 builds for a folder without one).
_PROBE_TEXT = "the movie was good, and I liked it: 10 / 10."

# How long a failed Hub probe sends a model's loads to the cache only (one command's loads)
_HUB_PROBE_SECONDS = 60.0
_hub_probes: dict[str, tuple[float, bool]] = {}

Note = Callable[[str], None]


def bundled_model(name: str, kind: Optional[str] = None) -> Optional[BundledModel]:
    """The bundled model ``name`` names (or its underscore spelling), None for a folder or Hub id.

    The one resolver of bundled names: every loader of this module calls it first, so a bundled
    name wins over a folder of that name in the working directory (pass ``./NAME`` for the folder).

    Parameters
    ----------
    name : str
        What ``--model`` was given.
    kind : str, optional
        The kind the command takes (a key of `KINDS`); None accepts every kind.

    Returns
    -------
    BundledModel or None

    Raises
    ------
    UsageError
        ``name`` is a bundled model of another kind: one line naming the commands that take it.
    ModelLoadError
        ``name`` is no existing path and so close to a bundled name that it is taken for a typo
        (a did-you-mean; the Hugging Face Hub is not asked).
    """
    model = BUNDLED_MODELS.get(name.replace("_", "-"))
    if model is None:
        close = did_you_mean(name.lower().replace("_", "-"), BUNDLED_MODELS, cutoff=_TYPO_CUTOFF)
        bare = not name.startswith((".", "~")) and "/" not in name and "\\" not in name
        if close and bare and not Path(name).exists():
            raise ModelLoadError(f"--model {name!r} is neither a bundled model nor a local folder.{close} "
                                 f"(bundled: {', '.join(BUNDLED_MODELS)}; pass ./{name} for a folder)")
        return None
    if kind is not None and model.kind != kind:
        what, commands = KINDS[model.kind]
        raise UsageError(f"--model {model.name} is the bundled {what.split(' ', 1)[1]}, not {KINDS[kind][0]}; "
                         f"the commands that take it: {commands}")
    return model


def bundled_models_help() -> str:
    """One paragraph for ``relprop --help``: the bundled names, each with what it is."""
    listed = "; ".join(f"{m.name}, {KINDS[m.kind][0]} ({m.about})" for m in BUNDLED_MODELS.values())
    return (f"Bundled models (offline; --model NAME in every command that takes their kind, underscores work "
            f"too): {listed}")


def model_help(*kinds: str) -> str:
    """The ``--model`` help of a command that takes models of ``kinds``: a folder, a Hub id or the
    bundled name(s) of those kinds."""
    names = " or ".join(m.name for m in BUNDLED_MODELS.values() if m.kind in kinds)
    return f"local model folder, Hugging Face Hub id, or the bundled {names}"


def _load_bundled(model: BundledModel):
    """The bundled ``model`` (eval mode): an image classifier, or (model, tokenizer) for text."""
    if model.kind == "image":
        from transformers import AutoModelForImageClassification

        return _load_classifier(AutoModelForImageClassification, str(model.folder))
    try:
        from .text import pretrained

        if model.kind == "text":
            return pretrained.load_sentiment_model(model.folder)
        return pretrained.load_tiny_lm(model.folder)
    except (ImportError, RuntimeError, OSError) as error:   # e.g. the MiniLM base package missing
        raise ModelLoadError(f"the bundled {model.name} could not be loaded: {_first_line(error)}") from None


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The error's first line, cut to its first sentence when long (transformers lists every model type)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    if len(line) > limit:
        end = line.find(". ", 0, limit)
        line = line[:end + 1] if end > 0 else line[:limit - 3] + "..."
    return line


def _local_folder(name: str) -> Optional[Path]:
    """``name`` as an existing model folder, None for a Hub id; a ModelLoadError for a file or a
    path that does not exist (Hub ids are "name" or "org/name")."""
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{name} is a file; pass the model folder (config.json + weights)")
    if local.exists():
        return local
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model folder not found: {name}")
    return None


def _hub_cache_only(name: str) -> bool:
    """Whether ``name`` must come from the local Hub cache: offline mode, or the Hub did not answer
    one request (no retries: transformers alone would retry for ~25 s before giving up). A Hub
    answer that the model does not exist is a ModelLoadError."""
    import huggingface_hub
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HFValidationError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    if getattr(huggingface_hub, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)():
        return True
    probed = _hub_probes.get(name)
    if probed and time.monotonic() - probed[0] < _HUB_PROBE_SECONDS:
        return probed[1]
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        cache_only = False
    except GatedRepoError:
        raise ModelLoadError(f"{name!r} is a gated model on the Hugging Face Hub: accept its terms on the "
                             "Hub and log in (hf auth login), or pass a local folder") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelLoadError(f"{name!r} is neither a local folder nor a model on the Hugging Face Hub "
                             "(a private one needs hf auth login); check the name") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{name!r}: revision not found on the Hugging Face Hub") from None
    except EntryNotFoundError:
        raise ModelLoadError(f"{name!r} on the Hugging Face Hub has no config.json: it is not a "
                             "transformers model") from None
    except Exception:  # no network, proxy, timeout, Hub down: the cache or nothing, at once
        cache_only = True
    _hub_probes[name] = (time.monotonic(), cache_only)
    return cache_only


def _from_pretrained(factory, name: str, **kwargs):
    """``factory.from_pretrained`` for a local folder or a Hub id, with errors that say what to do."""
    local = _local_folder(name)
    cache_only = local is not None or _hub_cache_only(name)
    try:
        return factory.from_pretrained(str(local) if local else name, local_files_only=cache_only, **kwargs)
    except OSError as error:
        if local is not None:
            where = "the folder has no loadable model (config.json + weights)"
        elif cache_only:
            from huggingface_hub import constants

            reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
                      else f"the Hub at {constants.ENDPOINT} could not be reached")
            raise ModelLoadError(
                f"cannot load {name!r}: it is not a local folder and could not be fetched from the Hugging Face "
                f"Hub ({reason}, and it is not in the local cache). Offline? Pass a folder saved with "
                "save_pretrained(), or download it first") from None
        else:
            where = "the Hugging Face Hub copy could not be loaded"
        raise ModelLoadError(f"cannot load {name!r}: {where}. Details: {_first_line(error)}") from None


def _load_classifier(factory, name: str):
    """A classifier of ``factory``'s kind in eval mode; a ModelLoadError that names the right
    command when the folder holds the other kind (or a model type no Auto class knows)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    local = _local_folder(name)
    if local is not None and not (local / "config.json").is_file():
        raise ModelLoadError(f"{name} has no config.json: pass the folder a model was saved to with "
                             "save_pretrained() (config.json + weights)")
    try:
        config = _from_pretrained(AutoConfig, name)
    except ModelLoadError:
        raise
    except (ValueError, KeyError) as error:  # a model_type this transformers does not know
        raise ModelLoadError(f"cannot read the config.json of {name!r}: {_first_line(error)} "
                             f"(transformers {transformers.__version__})") from None
    model_type = getattr(config, "model_type", "")
    mapping, wanted, _ = _KINDS[factory.__name__]
    if model_type not in getattr(modeling_auto, mapping):
        for other, (other_mapping, kind, command) in _KINDS.items():
            if other != factory.__name__ and model_type in getattr(modeling_auto, other_mapping):
                raise ModelLoadError(f"{name!r} is {kind} (model type {model_type!r}), not {wanted}; "
                                     f"explain it with `{command.format(name=name)}`")
        raise ModelLoadError(f"{name!r} has model type {model_type!r}, which is not {wanted} that transformers' "
                             f"{factory.__name__} can load (e.g. vit, deit for images; bert, roberta for text)")
    if factory.__name__ in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        _check_head(config, name, causal=factory.__name__ == "AutoModelForCausalLM")
    try:
        model = _from_pretrained(factory, name, config=config)
    except ModelLoadError:
        raise
    except ValueError as error:  # e.g. a config transformers knows but cannot pair with this head
        raise ModelLoadError(f"cannot load {name!r} as {wanted}: {_first_line(error)}") from None
    return model.eval()


def load_image_classifier(name: str):
    """An ``AutoModelForImageClassification`` from a bundled name, a folder or a Hub id, in eval mode.

    Raises
    ------
    ModelLoadError
        The folder or id cannot be loaded, or holds a model of another kind (a text classifier
        is named as such, with the command that explains it).
    """
    from transformers import AutoModelForImageClassification

    bundled = bundled_model(name, "image")
    if bundled is not None:
        return _load_bundled(bundled)
    return _load_classifier(AutoModelForImageClassification, name)


def _check_head(config, name: str, causal: bool) -> None:
    """Refuse a folder saved with the other text head: loading a causal LM as a classifier (or a
    BERT or a classifier as a causal LM) would give it a new, random head."""
    saved = getattr(config, "architectures", None) or []
    if not saved:
        return
    is_lm = [a.endswith(("ForCausalLM", "LMHeadModel")) for a in saved]
    if causal and not any(is_lm):
        raise ModelLoadError(f"{name!r} holds a {saved[0]}, not a causal language model; --generate needs one "
                             "(e.g. GPT2LMHeadModel, LlamaForCausalLM): drop --generate to explain it as "
                             "a text classifier")
    if not causal and all(is_lm):
        raise ModelLoadError(f"{name!r} holds a {saved[0]}, a causal language model, not a text classifier; "
                             f"explain what it generates with `relprop explain-text PROMPT --model {name} "
                             "--generate N`")


def load_causal_lm(name: str):
    """An ``AutoModelForCausalLM`` (eval mode) and its tokenizer, checked as in `load_text_classifier`
    (the bundled ``tiny-lm`` by name).

    Raises
    ------
    ModelLoadError
        The folder or id cannot be loaded, holds another kind of model, or has no usable tokenizer.
    """
    from transformers import AutoModelForCausalLM

    bundled = bundled_model(name, "generate")
    if bundled is not None:
        return _load_bundled(bundled)
    model = _load_classifier(AutoModelForCausalLM, name)
    return model, _load_tokenizer(name, model)


def load_text_classifier(name: str):
    """An ``AutoModelForSequenceClassification`` (eval mode) and its tokenizer (the bundled
    ``minilm-sst2`` by name).

    The tokenizer is refused (ModelLoadError) when it is missing -- transformers 5 then builds one
    that knows only its special tokens, so every word would be unknown -- when it maps plain words,
    digits and punctuation all to its unknown token, or when it has ids the model's embedding does
    not have.
    """
    from transformers import AutoModelForSequenceClassification

    bundled = bundled_model(name, "text")
    if bundled is not None:
        return _load_bundled(bundled)
    model = _load_classifier(AutoModelForSequenceClassification, name)
    return model, _load_tokenizer(name, model)


def _load_tokenizer(name: str, model):
    from transformers import AutoTokenizer

    try:
        tokenizer = _from_pretrained(AutoTokenizer, name)
    except ModelLoadError:
        raise
    except (ValueError, TypeError, KeyError) as error:  # no tokenizer files, or unusable ones
        raise ModelLoadError(f"no usable tokenizer for {name!r} ({_first_line(error)}); save the model's "
                             "tokenizer next to it with tokenizer.save_pretrained(FOLDER)") from None
    check_tokenizer(tokenizer, model, name)
    return tokenizer


def check_tokenizer(tokenizer, model, name: str) -> None:
    """Refuse a tokenizer that does not belong to ``model`` (see `load_text_classifier`).

    Raises
    ------
    ModelLoadError
        Naming ``name`` and what is wrong.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    if not set(vocab.values()) - special:
        raise ModelLoadError(f"no tokenizer in {name!r}: without tokenizer files (tokenizer.json, vocab.txt, ...) "
                             f"transformers builds one that knows only its {len(vocab)} special tokens, so every "
                             "word would be unknown; save the model's tokenizer there with "
                             "tokenizer.save_pretrained(FOLDER)")
    rows = model.get_input_embeddings().num_embeddings
    largest = max(vocab.values())
    if largest >= rows:
        raise ModelLoadError(f"the tokenizer of {name!r} has token ids up to {largest}, but the model's embedding "
                             f"has {rows} rows (config.vocab_size = {getattr(model.config, 'vocab_size', '?')}): "
                             "the tokenizer does not belong to this model")
    unknown = tokenizer.unk_token_id
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if unknown is not None and ids and all(i == unknown for i in ids):
        raise ModelLoadError(f"the tokenizer of {name!r} maps plain words, digits and punctuation all to "
                             f"{tokenizer.unk_token}: it does not belong to this model (or its vocabulary "
                             "file is broken)")


def _preprocessor_file(name: str, note: Note) -> Optional[Path]:
    """The model's preprocessor_config.json, or None (said in one note) when it has none."""
    bundled = bundled_model(name, "image")
    if bundled is not None:
        name = str(bundled.folder)
    local = _local_folder(name)
    if local is not None:
        file = local / PREPROCESSOR_FILE
        if file.is_file():
            return file
        note(f"{name} has no {PREPROCESSOR_FILE}; {DEFAULTS_NOTE}")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name, PREPROCESSOR_FILE, local_files_only=_hub_cache_only(name)))
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of EntryNotFoundError)
        why = "could not fetch its"
    except EntryNotFoundError:
        why = "has no"
    except OSError:
        why = "could not fetch its"
    note(f"{name} {why} {PREPROCESSOR_FILE}; {DEFAULTS_NOTE}")
    return None


def _load_processor(file: Path):
    """The image processor a preprocessor_config.json describes; a ModelLoadError naming the file
    when it is not JSON or not a processor this transformers knows."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{file} is not valid JSON ({error}); fix it, or delete it to use the "
                             "ViT defaults") from None
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{file} is not a JSON object of preprocessing settings; fix it, or delete it to "
                             "use the ViT defaults")
    kind = settings.get("image_processor_type")
    verbosity = transformers.logging.get_verbosity()
    try:
        # quiet: transformers would advise installing torchvision, which the PIL backend does not need
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoImageProcessor.from_pretrained(str(file.parent), backend="pil", local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        detail = (f"unknown image_processor_type {kind!r} (transformers {transformers.__version__} has no such "
                  "class)" if isinstance(kind, str) and not hasattr(transformers, kind) else _first_line(error))
        raise ModelLoadError(f"cannot use {file}: {detail}; fix the file, or delete it to use the "
                             "ViT defaults") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def preprocessor_settings(name: str, note: Optional[Note] = None) -> dict:
    """The settings in model ``name``'s preprocessor_config.json, checked as
    `ImagePreprocessor.for_model` checks them (a ModelLoadError for a file transformers cannot
    use), or {} when it has none (said through ``note``, default a warning)."""
    file = _preprocessor_file(name, note or _warn)
    if file is None:
        return {}
    _load_processor(file)
    return json.loads(file.read_text(encoding="utf-8"))


@dataclass
class ImagePreprocessor:
    """The model's own image preprocessing (its preprocessor_config.json), or ViT defaults:
    resize to the model's input size, scale to [0, 1], normalise with mean = std = 0.5."""

    transform: Callable
    mean: Sequence[float]
    std: Sequence[float]
    normalizes: bool

    @classmethod
    def for_model(cls, name: str, model, note: Optional[Note] = None) -> "ImagePreprocessor":
        """The preprocessing of model ``name`` (folder or Hub id).

        Parameters
        ----------
        name : str
            What the model was loaded from.
        model : torch.nn.Module
            The loaded model (its config gives the default input size).
        note : callable, optional
            Receives one line when the defaults are used for lack of a preprocessor_config.json
            (default: a warning).

        Raises
        ------
        ModelLoadError
            The preprocessor_config.json exists but is not valid JSON or names a processor this
            transformers does not know.
        """
        file = _preprocessor_file(name, note or _warn)
        if file is not None:
            processor = _load_processor(file)
        else:
            try:  # transformers 5: the PIL backend (the default one needs torchvision)
                from transformers import ViTImageProcessorPil as ViTImageProcessor
            except ImportError:
                from transformers import ViTImageProcessor
            size = getattr(model.config, "image_size", 224)
            processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(DEFAULT_MEAN),
                                          image_std=list(DEFAULT_STD))
        normalizes = bool(getattr(processor, "do_normalize", True))
        return cls(lambda images: processor(images=images, return_tensors="pt")["pixel_values"],
                   list(getattr(processor, "image_mean", DEFAULT_MEAN)), list(getattr(processor, "image_std", DEFAULT_STD)),
                   normalizes)

    def __call__(self, images) -> torch.Tensor:
        return self.transform(images)

    def to_display(self, pixel_values: torch.Tensor) -> np.ndarray:
        """[B, 3, H, W] model input -> [B, H, W, 3] uint8 image as the model saw it."""
        x = pixel_values.detach().float().cpu()
        if self.normalizes:
            x = x * torch.tensor(self.std)[:, None, None] + torch.tensor(self.mean)[:, None, None]
        return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def read_image(path: str | Path | BinaryIO, note: Optional[Note] = None):
    """An 8-bit RGB PIL image of the file as it looks, or an InputError naming the file.

    Pillow's own ``convert("RGB")`` clips images beyond 8 bits (16-bit ones turn white, float
    ones black), so those are scaled by their real range first:

    - 16-bit (``I;16``, ``I;16B``, ...): divided by 65535;
    - 32-bit integer (``I``): divided by 65535 when every value lies in [0, 65535] (how Pillow
      decodes 16-bit PGM/PPM files, whatever their maxval, and some 16-bit TIFFs); otherwise
      there is no standard white level, so min-max scaled, said in a note;
    - float (``F``): as is when every value lies in [0, 1]; otherwise min-max scaled, said in a
      note; NaN or infinite pixels are refused.

    Then rounded to 8 bits (what the processors take), so a 16-bit or float copy of an 8-bit
    picture gives the 8-bit picture back exactly.

    Parameters
    ----------
    path : str, Path or binary file
        The image file (an open binary file, e.g. uploaded bytes, is named by its ``str``).
    note : callable, optional
        Receives one line when an image is min-max scaled (default: a warning).

    Raises
    ------
    InputError
        The file cannot be read, is a decompression bomb (more pixels than Pillow's
        ``Image.MAX_IMAGE_PIXELS`` allows), or has non-finite pixels.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
                return image.convert("RGB")
            values = np.asarray(image)
            mode = image.mode
    except Image.DecompressionBombError as error:
        raise InputError(f"cannot read image {str(path)!r}: refused as a possible decompression bomb ({error}); "
                         "shrink it first if the file is trusted") from None
    except (OSError, ValueError, EOFError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise InputError(f"cannot read image {str(path)!r}: {_first_line(error)}") from None
    scaled = _unit_range(values.astype(np.float64), mode, str(path), note or _warn)
    gray = Image.fromarray((scaled * 255).round().astype(np.uint8))
    return gray.convert("RGB")


def _unit_range(values: np.ndarray, mode: str, path: str, note: Note) -> np.ndarray:
    """A single-channel high-bit-depth or float image in [0, 1] (see `read_image`)."""
    if not np.isfinite(values).all():
        raise InputError(f"cannot read image {path!r}: it has NaN or infinite pixels")
    low, high = values.min(), values.max()
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        return values / 65535
    if mode == "F" and low >= 0 and high <= 1:
        return values
    kind = "float" if mode == "F" else "32-bit integer"
    note(f"{path}: {kind} pixels span [{low:.6g}, {high:.6g}], not "
         f"{'[0, 1]' if mode == 'F' else 'a 16-bit range'}; scaled min-max to [0, 1] (relative brightness only)")
    return (values - low) / (high - low) if high > low else np.clip(values, 0, 1)
