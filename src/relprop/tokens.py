"""Token layouts of hierarchical vision models (Swin): window attention placed over the token grid.

A windowed model computes attention per window: A is [B * windows, H, S, S] over the S tokens of
each window, after the block has rearranged its token sequence [B, L, C] (cyclic shift, padding,
window partition). relprop reports every block's attention, gradient and relevance as one
[B, H, L, L] matrix over the block's token sequence (block diagonal in the windows; zero between
tokens of different windows, which do not attend to each other).

Where each window token comes from is read from the model's own graph: the routing operations
between the block's token sequence and its query/key projections are run again on the tokens'
numbers instead of their values (a cyclic shift moves the numbers as it moves the tokens, padding
brings in zeros = no token). The grid each block's tokens lie on, and how a patch merging nests a
grid in the next, are declared by the family (`registry.Family.token_grids`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UnsupportedModelError
from .graph import Program, Ref

_PASS_THROUGH = ("route", "copy")


@dataclass
class Layout:
    """Per explained block: the window map and the token grid; between blocks: the merging.

    ``windows[b]``: [W, S] long, the number ``batch * L + token + 1`` of each window token in
    block ``b``'s token sequence of L tokens (0: a padding token); None where the attention
    already spans the whole sequence. ``parents[b]`` (``b`` < last): None where block ``b + 1``
    attends over the same tokens, else [L_b] long, the token of block ``b + 1`` that each of
    block ``b``'s tokens was merged into.
    """

    windows: list[Optional[torch.Tensor]]
    sizes: list[int]
    parents: list[Optional[torch.Tensor]]

    def globalize(self, block: int, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """[W, H, S, S] per window -> [B, H, L, L] over the block's tokens (0 across windows)."""
        index = self.windows[block]
        if index is None:
            return tensor
        size = self.sizes[block]
        real = index > 0
        token = torch.where(real, (index - 1) % size, torch.full_like(index, size))   # padding -> a spare slot
        sample = ((index - 1).clamp(min=0) // size).amax(dim=1)                        # the window's sample
        out = tensor.new_zeros(batch, tensor.shape[1], size + 1, size + 1)
        out[sample[:, None, None], :, token[:, :, None], token[:, None, :]] = tensor.permute(0, 2, 3, 1)
        return out[:, :, :size, :size]


def _walk_back_to_projections(program: Program, site: int) -> list[int]:
    """The inputs of the linear projections that feed the attention probabilities of ``site``
    (queries and keys; for SDPA also values)."""
    steps = program.steps
    found, frontier, seen = [], list(steps[site].data_inputs), set()
    while frontier:
        index = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        step = steps[index]
        if step.kind in ("linear", "addmm"):
            found.extend(step.data_inputs)
        elif step.data_inputs and step.kind != "attention":
            frontier.extend(step.data_inputs)
    return sorted(set(found))


def _routing_chain(program: Program, start: int) -> tuple[int, list[int]]:
    """From ``start`` back through pure routing steps: (the token sequence step, the chain in
    forward order)."""
    steps, chain, index = program.steps, [], start
    while steps[index].kind in _PASS_THROUGH and len(steps[index].data_inputs) == 1:
        chain.append(index)
        index = steps[index].data_inputs[0]
    return index, chain[::-1]


def _replay(fwd, chain: list[int], numbers: torch.Tensor) -> torch.Tensor:
    """Run the routing steps of ``chain`` on ``numbers`` in place of the tokens' values."""
    from .engine import _in_dtype

    value, previous = numbers, None
    for index in chain:
        step = fwd.program.steps[index]
        source = step.data_inputs[0] if previous is None else previous

        def substitute(obj):
            if isinstance(obj, Ref):
                return value if obj.index == source else fwd.values[obj.index]
            if isinstance(obj, (list, tuple)):
                return type(obj)(substitute(o) for o in obj)
            if isinstance(obj, dict):
                return {k: substitute(v) for k, v in obj.items()}
            return obj

        value = step.target(*_in_dtype(substitute(step.args), numbers.dtype),
                            **_in_dtype(substitute(step.kwargs), numbers.dtype))
        previous = index
    return value


def window_map(fwd, site: int, batch: int) -> tuple[Optional[torch.Tensor], int]:
    """``(windows, L)`` for the attention at step ``site`` (see `Layout.windows`)."""
    program, steps = fwd.program, fwd.program.steps
    where = steps[site].where()
    sources = _walk_back_to_projections(program, site)
    if len(sources) != 1:
        raise UnsupportedModelError(f"relprop cannot place the attention of {where} over the tokens: its queries "
                                    "and keys are projected from different tensors")
    root, chain = _routing_chain(program, sources[0])
    shape = fwd.shapes[root]
    attention = fwd.attention[fwd.site_of_step[site]]
    if not chain and tuple(attention.shape[:1]) == (batch,):
        return None, attention.shape[-1]
    if len(shape) != 3 or shape[0] != batch:
        raise UnsupportedModelError(f"relprop cannot place the windowed attention of {where} over the tokens: "
                                    f"the token sequence it reads has shape {shape}, expected [batch, tokens, channels]")
    size = shape[1]
    numbers = torch.arange(1, batch * size + 1, dtype=torch.float64, device=attention.device)
    numbers = numbers.reshape(batch, size, 1).expand(shape)
    windows = _replay(fwd, chain, numbers)
    if tuple(windows.shape[:-1]) != (attention.shape[0], attention.shape[-1]):
        raise UnsupportedModelError(f"relprop cannot place the windowed attention of {where} over the tokens: "
                                    f"its windows {tuple(windows.shape[:-1])} do not match the attention "
                                    f"{tuple(attention.shape)}")
    index = windows[..., 0].round().long()
    real = index > 0
    sample = (index - 1).clamp(min=0) // size
    if ((sample != sample.amax(dim=1, keepdim=True)) & real).any():
        raise UnsupportedModelError(f"relprop cannot place the windowed attention of {where} over the tokens: "
                                    "a window mixes samples of the batch")
    return index, size


def merge_parents(fine: tuple[int, int], coarse: tuple[int, int], device) -> torch.Tensor:
    """[h * w] long: the token of the ``coarse`` grid each token of the ``fine`` grid was merged
    into (row-major grids; token (y, x) goes to (y // f_h, x // f_w), f = ceil(fine / coarse))."""
    (h, w), (ch, cw) = fine, coarse
    fh, fw = -(-h // ch), -(-w // cw)
    y = torch.arange(h, device=device) // fh
    x = torch.arange(w, device=device) // fw
    return (y[:, None] * cw + x[None, :]).reshape(-1)


def layout(fwd, sites: list[int], grids: list[tuple[int, int]], batch: int, owner: str) -> Layout:
    """The `Layout` of the explained attention ``sites`` (graph steps) on the declared ``grids``."""
    if len(grids) != len(sites):
        raise UnsupportedModelError(f"{owner}: the family declares {len(grids)} token grids for "
                                    f"{len(sites)} attention blocks found in the exported graph")
    windows, sizes = [], []
    for block, (site, grid) in enumerate(zip(sites, grids)):
        index, size = window_map(fwd, site, batch)
        if size != grid[0] * grid[1]:
            raise UnsupportedModelError(f"{owner}: attention block {block} ({fwd.program.steps[site].where()}) "
                                        f"spans {size} tokens, expected a {grid[0]}x{grid[1]} token grid")
        windows.append(index)
        sizes.append(size)
    device = fwd.attention[0].device
    parents = [None if grids[b] == grids[b + 1] else merge_parents(grids[b], grids[b + 1], device)
               for b in range(len(grids) - 1)]
    return Layout(windows, sizes, parents)
