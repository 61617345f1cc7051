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
    gradient_rules: Optional[str] = None        # a `gradient_rules` set: relevance = embedding x modified gradient
    biases: str = "absorb"                      # with gradient_rules: do biases keep a share


@dataclass
class Trace:
    """Per-block attention A, its gradient dA and its relevance R_A, for one batch.

    The last block may have been evaluated for the pooled rows only; use `row` to read a
    token's row of any block.

    The pooled row is row ``token`` of a block's matrix, or, where the model average-pools its
    tokens (``readout`` set), the ``readout``-weighted sum of all rows. In a hierarchical model
    (Swin) later blocks attend over a coarser token grid: ``parents[b]`` gives, for each token of
    block ``b``, the token of block ``b + 1`` it was merged into (None: the same tokens), and
    `descend` / `to_first` carry a row over a block's tokens down to block 0's tokens, over which
    every method reports.
    """

    attention: list[torch.Tensor]                     # [B, H, R, N]
    attention_grad: dict[int, torch.Tensor]
    attention_relevance: dict[int, torch.Tensor]
    rows: list[Optional[list[int]]]                   # per block: computed query rows (None = all)
    valid: torch.Tensor                               # [B, N] real tokens (block 0's tokens)
    content: torch.Tensor                             # token indices a map reports on
    token: int = 0                                    # the pooled ([CLS]) token
    input_relevance: Optional[torch.Tensor] = None
    readout: Optional[torch.Tensor] = None            # [B, N_last] weights of the pooled row (None: `token`)
    parents: Optional[list[Optional[torch.Tensor]]] = None   # per block < last (see above)
    reduced: dict[int, torch.Tensor] = field(default_factory=dict)   # block -> `Method.reduce_block` result

    @property
    def num_blocks(self) -> int:
        return len(self.attention)

    def row(self, tensor: torch.Tensor, block: int, token: Optional[int] = None) -> torch.Tensor:
        """Row ``token`` (default: the pooled row) of a [B, H, R, N] or [B, R, N] tensor."""
        if token is None and self.readout is not None:
            weights = self.readout.reshape(self.readout.shape[:1] + (1,) * (tensor.dim() - 3) + (-1, 1))
            return (tensor * weights.to(tensor.dtype)).sum(dim=-2)
        token = self.token if token is None else token
        rows = self.rows[block]
        index = token if rows is None else rows.index(token)
        return tensor[..., index, :]

    def descend(self, row: torch.Tensor, block: int, share: bool = True) -> torch.Tensor:
        """A row over block ``block + 1``'s tokens as a row over block ``block``'s tokens: each
        merged token's value goes to the tokens it was made of, shared equally among them
        (``share``: totals are kept) or copied to each."""
        parents = None if self.parents is None else self.parents[block]
        if parents is None:
            return row
        spread = row[:, parents]
        if share:
            counts = torch.bincount(parents, minlength=row.shape[-1]).to(row.dtype)
            spread = spread / counts[parents]
        return spread

    def to_first(self, row: torch.Tensor, block: int, share: bool = True) -> torch.Tensor:
        """A row over block ``block``'s tokens as a row over block 0's tokens (see `descend`)."""
        for lower in range(block - 1, -1, -1):
            row = self.descend(row, lower, share)
        return row

    def is_first_grid(self, block: int) -> bool:
        """Whether block ``block`` attends over block 0's tokens (no merging below it)."""
        return self.parents is None or all(p is None for p in self.parents[:block])

    def content_mask(self, block: int) -> torch.Tensor:
        """[B, N_block] bool: the real content tokens of a block. Past a merging every token is
        (hierarchical models have neither padding nor prefix tokens)."""
        if not self.is_first_grid(block):
            n = self.attention[block].shape[-1]
            return torch.ones(self.valid.shape[0], n, dtype=torch.bool, device=self.valid.device)
        content = torch.zeros_like(self.valid)
        content[:, self.content] = True
        return content & self.valid

    def valid_mask(self, block: int) -> torch.Tensor:
        """[B, N_block] bool: the real (non-padding) tokens of a block."""
        if not self.is_first_grid(block):
            return self.content_mask(block)
        return self.valid


class Method:
    """An explanation method: declares options and needs, maps a Trace to token scores."""

    name: str = ""
    #: option name -> default; a family may override defaults (`registry.Family.method_defaults`)
    options: dict[str, Any] = {}
    #: True if the result is per input element (pixels/positions) rather than per token
    input_level: bool = False

    def requirements(self, num_blocks: int, **options) -> Requirements:
        raise NotImplementedError

    def reduce_block(self, grad: torch.Tensor, relevance: torch.Tensor, **options) -> Optional[torch.Tensor]:
        """A block's ∇A and R_A [B, H, N, N], reduced as soon as the relevance propagation
        reaches the block (``Trace.reduced[block]``), so that no block's R_A is kept; None (the
        default): the method reads the full tensors from the Trace."""
        return None

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
    """The registered explanation methods (``relprop.methods()``).

    Returns
    -------
    list of str
        Method names, sorted; each is a valid ``method`` of `relprop.Explainer.explain`.
    """
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
    """The pooled row of prod_l (M_l + I), l from the last block down to ``start``, over
    block 0's tokens.

    ``mixing(block, token)`` returns a block's head-averaged matrix [B, N, N], or only the
    pooled token's row [B, N] when ``token`` is given (all the last block contributes).
    Rows are normalised to sum to 1 when ``normalize``. Across a patch merging the row goes to
    the finer tokens by `Trace.descend` (shared: a normalised rollout row keeps summing to 1).
    """
    last = trace.num_blocks - 1
    if trace.readout is None:
        row = mixing(last, trace.token).clone()
        row[:, trace.token] += 1
        if normalize:
            row = row / row.sum(dim=-1, keepdim=True)
    else:       # the readout's weighted rows of (M + I), each normalised first
        matrix = _plus_identity(mixing(last, None), normalize)
        row = trace.row(matrix, last)
    for block in range(last - 1, start - 1, -1):
        row = trace.descend(row, block)
        matrix = _plus_identity(mixing(block, None), normalize)
        row = (row.unsqueeze(1) @ matrix).squeeze(1)
    return trace.to_first(row, start)


def _plus_identity(matrix: torch.Tensor, normalize: bool) -> torch.Tensor:
    matrix = matrix + torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix / matrix.sum(dim=-1, keepdim=True) if normalize else matrix
