"""A family-independent description of an encoder-only Transformer classifier.

Model adapters translate a user's model into these plain records (tensors are views of the
model's parameters, or copies in another dtype); the engine runs, differentiates and
propagates relevance through the records only, so the user's model is never called,
hooked or modified.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Linear:
    weight: torch.Tensor            # [out, in]
    bias: Optional[torch.Tensor]    # [out] or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def with_preactivation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x @ W.T, x @ W.T + b)``: the bias-free product is reused by the LRP rules."""
        product = torch.nn.functional.linear(x, self.weight)
        return product, product if self.bias is None else product + self.bias


@dataclass
class LayerNorm:
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


@dataclass
class Block:
    """One encoder block: self-attention and MLP, each with a residual connection.

    ``pre_norm`` blocks (ViT) normalise each branch's input; post-norm blocks (BERT) normalise
    after each residual addition. ``qkv_fork`` says whether the query/key/value projections
    are separate consumers of their input (``"clone"``, BERT) or one fused layer (``"fused"``,
    ViT), which is how the reference propagates relevance through them.
    """

    query: Linear
    key: Linear
    value: Linear
    out: Linear
    fc1: Linear
    fc2: Linear
    norm1: LayerNorm
    norm2: LayerNorm
    activation: Activation
    num_heads: int
    pre_norm: bool
    qkv_fork: str = "fused"
    masked: bool = False            # attention scores get an additive key mask (text models)


@dataclass
class HeadBranch:
    """Pool one token, then a chain of linear layers with activations in between."""

    token: int
    layers: list[Linear]
    activations: list[Optional[Activation]]   # after each layer but the last


@dataclass
class Architecture:
    blocks: list[Block]
    final_norm: Optional[LayerNorm]           # pre-norm models normalise the last block's output
    head: list[HeadBranch]                    # several branches are averaged (DeiT with teacher)
    prefix_tokens: int                        # [CLS] (+ distillation) tokens before the content
    modality: str                             # "image" or "text"
    labels: dict[int, str] = field(default_factory=dict)

    @property
    def pooled_tokens(self) -> list[int]:
        return sorted({branch.token for branch in self.head})
