"""Hugging Face BERT, RoBERTa and DistilBERT sequence classifiers."""
from __future__ import annotations

from typing import Any

import torch
from transformers.activations import ACT2FN

from ..architecture import Architecture, Block, HeadBranch
from ..errors import InputError, UnsupportedModelError
from .base import Adapter, Prepared, first_class_name, labels_of


class TextAdapter(Adapter):
    """Post-norm text encoders: embeddings -> LayerNorm -> blocks -> pooled [CLS] head."""

    # the authors' text code: the method's rollout is row-normalised and, by default, uses
    # the last layer only; GradCAM averages the gradient over the whole attention matrix
    method_defaults: dict[str, dict[str, Any]] = {
        "attn_gradcam": {"scope": "matrix"},
        "transformer_attribution": {"start_layer": -1, "row_normalize": True},
    }
    base_name: str = ""
    model_classes: tuple[str, ...] = ()

    @classmethod
    def matches(cls, model):
        return first_class_name(model, cls.model_classes) is not None

    def __init__(self, model, dtype):
        super().__init__(model, dtype)
        config = model.config
        base = getattr(model, self.base_name)
        emb = base.embeddings
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"position_embedding_type={config.position_embedding_type!r}: "
                                        "relprop supports absolute position embeddings only")
        self.word = self.tensor(emb.word_embeddings.weight)
        self.position = self.tensor(emb.position_embeddings.weight)
        token_type = getattr(emb, "token_type_embeddings", None)
        self.token_type = self.tensor(token_type.weight) if token_type is not None else None
        self.embed_norm = self.layer_norm(emb.LayerNorm)
        self.padding_idx = getattr(emb, "padding_idx", None)
        if self.padding_idx is None:
            self.padding_idx = getattr(config, "pad_token_id", None)
        self.architecture = Architecture(self._blocks(base, config), None, self._head(model),
                                         prefix_tokens=0, modality="text", labels=labels_of(model))

    # -- subclasses describe their layout -------------------------------------------------
    def _blocks(self, base, config) -> list[Block]:
        activation = ACT2FN[config.hidden_act]
        blocks = []
        for layer in base.encoder.layer:
            attention = layer.attention
            blocks.append(Block(
                query=self.linear(attention.self.query), key=self.linear(attention.self.key),
                value=self.linear(attention.self.value), out=self.linear(attention.output.dense),
                fc1=self.linear(layer.intermediate.dense), fc2=self.linear(layer.output.dense),
                norm1=self.layer_norm(attention.output.LayerNorm), norm2=self.layer_norm(layer.output.LayerNorm),
                activation=activation, num_heads=config.num_attention_heads, pre_norm=False,
                qkv_fork="clone", masked=True))
        return blocks

    def _head(self, model) -> list[HeadBranch]:
        raise NotImplementedError

    def position_ids(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    # -- inputs -----------------------------------------------------------------------------
    def _unpack(self, inputs: Any):
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
        types = inputs.get("token_type_ids")
        if types is not None:
            types = torch.as_tensor(types)
            if types.shape != ids.shape:
                raise InputError(f"token_type_ids shape {tuple(types.shape)} differs from input_ids {tuple(ids.shape)}")
        return ids.long(), mask.bool(), types

    def batch_size(self, inputs: Any) -> int:
        return self._unpack(inputs)[0].shape[0]

    def prepare(self, inputs: Any) -> Prepared:
        ids, valid, types = self._unpack(inputs)
        ids, valid = ids.to(self.device), valid.to(self.device)
        vocab = self.word.shape[0]
        if (ids < 0).any() or (ids >= vocab).any():
            raise InputError(f"input_ids outside the model's vocabulary (0..{vocab - 1}); "
                             "was the text tokenized with this model's tokenizer?")
        if not valid[:, 0].all():
            raise InputError("the first token (the pooled [CLS]) is padding in some sample; "
                             "use right padding (the tokenizer's default for these models)")
        positions = self.position_ids(ids, valid)
        if positions.max() >= self.position.shape[0]:
            raise InputError(f"sequence too long for the model: {ids.shape[1]} tokens; truncate "
                             "(tokenizer(..., truncation=True)) or explain with windows "
                             "(relprop.text.explain_text(..., long_text='windows'))")
        hidden = self.word[ids] + self.position[positions]
        if self.token_type is not None:
            types = torch.zeros_like(ids) if types is None else types.to(self.device).long()
            hidden = hidden + self.token_type[types]
        hidden = self.embed_norm(hidden)
        content = torch.arange(ids.shape[1], device=self.device)
        return Prepared(hidden, valid, content, {"attention_mask": valid, "input_ids": ids})

    def finalize(self, scores, prepared, input_level):
        return scores.masked_fill(~prepared.valid, 0)

    def input_relevance(self, prepared, relevance, rules):
        """Relevance of each position at the encoder input (after the embedding LayerNorm),
        summed over the hidden size; the reference stops there too."""
        return relevance.sum(dim=-1)


def _head_linear(adapter: Adapter, module, what: str):
    if not isinstance(module, torch.nn.Linear):
        raise UnsupportedModelError(f"{what} is {type(module).__name__}, expected a Linear layer")
    return adapter.linear(module)


class BertAdapter(TextAdapter):
    family = "Hugging Face BERT"
    base_name = "bert"
    model_classes = ("BertForSequenceClassification",)

    def _head(self, model):
        pooler = model.bert.pooler
        if pooler is None:
            raise UnsupportedModelError("BertForSequenceClassification without a pooler is not supported")
        return [HeadBranch(0, [_head_linear(self, pooler.dense, "bert.pooler.dense"),
                               _head_linear(self, model.classifier, "classifier")], [torch.tanh])]


class RobertaAdapter(TextAdapter):
    family = "Hugging Face RoBERTa"
    base_name = "roberta"
    model_classes = ("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification")

    def _head(self, model):
        head = model.classifier
        return [HeadBranch(0, [_head_linear(self, head.dense, "classifier.dense"),
                               _head_linear(self, head.out_proj, "classifier.out_proj")], [torch.tanh])]

    def position_ids(self, input_ids, valid):
        # RoBERTa numbers real tokens from padding_idx + 1 (as transformers does from the ids)
        not_pad = input_ids.ne(self.padding_idx).long()
        return torch.cumsum(not_pad, dim=1) * not_pad + self.padding_idx


class DistilBertAdapter(TextAdapter):
    family = "Hugging Face DistilBERT"
    base_name = "distilbert"
    model_classes = ("DistilBertForSequenceClassification",)

    def _blocks(self, base, config):
        activation = ACT2FN[config.activation]
        blocks = []
        for layer in base.transformer.layer:
            attention = layer.attention
            blocks.append(Block(
                query=self.linear(attention.q_lin), key=self.linear(attention.k_lin),
                value=self.linear(attention.v_lin), out=self.linear(attention.out_lin),
                fc1=self.linear(layer.ffn.lin1), fc2=self.linear(layer.ffn.lin2),
                norm1=self.layer_norm(layer.sa_layer_norm), norm2=self.layer_norm(layer.output_layer_norm),
                activation=activation, num_heads=config.n_heads, pre_norm=False, qkv_fork="clone", masked=True))
        return blocks

    def _head(self, model):
        return [HeadBranch(0, [_head_linear(self, model.pre_classifier, "pre_classifier"),
                               _head_linear(self, model.classifier, "classifier")], [torch.relu])]
