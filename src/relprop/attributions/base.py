"""The method interface, the registry, and what a method may read from a pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import OptionError, UnknownMethodError, did_you_mean


@dataclass
class Requirements:
    """What a method needs computed; the engine does nothing more."""

    gradient_blocks: set[int] = field(default_factory=set)
    relevance_rules: Optional[str] = None
    relevance_lowest: Optional[int] = None     # lowest block whose attention relevance is needed
    input_relevance: bool = False
    all_rows: bool = False                      # every query row of the last block


@dataclass
class Trace:
    """Per-block attention A, its gradient dA and its relevance R_A, for one batch.

    The last block may have been evaluated for the pooled rows only; use `row` to read a
    token's row of any block.
    """

    attention: list[torch.Tensor]                     # [B, H, R, N]
    attention_grad: dict[int, torch.Tensor]
    attention_relevance: dict[int, torch.Tensor]
    rows: list[Optional[list[int]]]                   # per block: computed query rows (None = all)
    valid: torch.Tensor                               # [B, N] real tokens
    content: torch.Tensor                             # token indices a map reports on
    token: int = 0                                    # the pooled ([CLS]) token
    input_relevance: Optional[torch.Tensor] = None
    #: [B, N] weights of the pooled row when the classifier averages tokens (mean pooling: the
    #: pooled row is the weighted mean of all rows); None: the row of ``token``
    pooled: Optional[torch.Tensor] = None

    @property
    def num_blocks(self) -> int:
        return len(self.attention)

    def row(self, tensor: torch.Tensor, block: int, token: Optional[int] = None) -> torch.Tensor:
        """Row ``token`` (default: the pooled row) of a [B, H, R, N] or [B, R, N] tensor."""
        if token is None and self.pooled is not None:
            if self.rows[block] is not None:
                raise RuntimeError("internal error: mean pooling needs every row of the block")
            weights = self.pooled.to(tensor.dtype).reshape(
                (self.pooled.shape[0],) + (1,) * (tensor.dim() - 3) + (self.pooled.shape[1], 1))
            return (tensor * weights).sum(dim=-2)
        token = self.token if token is None else token
        rows = self.rows[block]
        index = token if rows is None else rows.index(token)
        return tensor[..., index, :]


class Method:
    """An explanation method: declares options and needs, maps a Trace to token scores."""

    name: str = ""
    #: option name -> default; a family may override defaults (`families.Family.method_defaults`)
    options: dict[str, Any] = {}
    #: True if the result is per input element (pixels/positions) rather than per token
    input_level: bool = False

    def requirements(self, num_blocks: int, **options) -> Requirements:
        raise NotImplementedError

    def __call__(self, trace: Trace, **options) -> torch.Tensor:
        """[B, N] scores for every token (the caller selects content tokens)."""
        raise NotImplementedError


_REGISTRY: dict[str, Method] = {}


def register(cls):
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}.{did_you_mean(str(name), _REGISTRY)} "
                                 f"Registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve_options(method: Method, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = set(given) - set(method.options)
    if unknown:
        name = sorted(unknown)[0]
        allowed = ", ".join(sorted(method.options)) or "none"
        raise OptionError(f"method {method.name!r} has no option {name!r}.{did_you_mean(name, method.options)} "
                          f"Its options: {allowed}")
    return {**method.options, **{k: v for k, v in defaults.items() if k in method.options}, **given}


def block_index(value: int, num_blocks: int, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -num_blocks <= value < num_blocks:
        raise OptionError(f"{option} must be an integer in [{-num_blocks}, {num_blocks - 1}] "
                          f"for this {num_blocks}-block model, got {value!r}")
    return value % num_blocks


def head_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=1)


def rollout_row(trace: Trace, mixing, start: int, normalize: bool) -> torch.Tensor:
    """The pooled row of prod_l (M_l + I), l from the last block down to ``start``.

    ``mixing(block, token)`` returns a block's head-averaged matrix [B, N, N], or only the
    pooled token's row [B, N] when ``token`` is given (all the last block contributes).
    Rows are normalised to sum to 1 when ``normalize``. Under mean pooling (``trace.pooled``)
    the pooled row is the pooling weights times the product (each row normalised first).
    """
    last = trace.num_blocks - 1
    if trace.pooled is None:
        row = mixing(last, trace.token).clone()
        row[:, trace.token] += 1
        if normalize:
            row = row / row.sum(dim=-1, keepdim=True)
        below = last - 1
    else:
        row = trace.pooled.to(trace.attention[last].dtype)
        below = last
    for block in range(below, start - 1, -1):
        matrix = mixing(block, None)
        matrix = matrix + torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        if normalize:
            matrix = matrix / matrix.sum(dim=-1, keepdim=True)
        row = (row.unsqueeze(1) @ matrix).squeeze(1)
    return row
