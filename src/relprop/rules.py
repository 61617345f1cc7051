"""LRP rules as small objects, one per layer kind.

Each rule maps the relevance of a layer's output back to its input(s). They follow the
reference implementation of Chefer et al. (CVPR 2021) operation for operation, because the
maps are ill-conditioned: a different but algebraically equal formula changes the result
far beyond rounding. Two rule sets exist:

* ``PAPER``: the paper's rules (alpha=1/beta=0 with one shared denominator for the positive
  and negative parts; residual additions renormalised by the branches' absolute sums).
* ``PLAIN``: plain LRP as used for the paper's LRP baselines (separate denominators,
  un-normalised additions).

All sums that normalise are taken per sample (over every dimension but the first), so a
batch gives exactly what each sample gives alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from .errors import OptionError

EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / (b + 1e-9)``, and 0 where ``b == 0``: the reference's stabiliser (its
    ``clamp(min=eps) + clamp(max=eps)`` is ``b + eps``; a zero sum gets eps), in fewer passes."""
    den = b + EPS
    den.masked_fill_(den == 0, EPS)
    out = a / den
    return out.masked_fill_(b == 0, 0)


def _safe_divide_into(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """`safe_divide` that reuses ``b``'s memory (``b`` must be a temporary of the caller)."""
    zero = b == 0
    b += eps
    b.masked_fill_(b == 0, eps)
    torch.div(a, b, out=b)
    return b.masked_fill_(zero, 0)


def per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))


class LinearRule:
    """Relevance of ``x`` in ``z = x @ W.T (+ b)``; the bias never receives relevance.

    ``product`` is ``x @ W.T`` from the forward pass, when the caller kept it. ``W`` may be
    batched ([..., out, in], a product with a constant per batch entry: ``.mT`` transposes).
    """

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                 product: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


class ZPlusSharedRule(LinearRule):
    """alpha=1, beta=0 with one denominator ``x+ W+ + x- W-`` (the paper's rule).

    Computed with ``x+ W+ + x- W- = (x W + |x| |W|) / 2`` and
    ``x+ (S W+) + x- (S W-) = (x (S W) + |x| (S |W|)) / 2``: with the forward's ``x W`` this
    takes three matrix products instead of four (equal up to rounding; the golden tests hold).
    The two halvings cancel: dividing by the doubled denominator (and doubled stabiliser) gives
    the same numbers exactly (scaling by 2 is exact in binary floating point), two passes fewer.
    """

    def __call__(self, x, weight, relevance, product=None):
        if product is None:
            product = x @ weight.mT
        abs_x, abs_w = x.abs(), weight.abs()
        denominator = abs_x @ abs_w.mT
        denominator += product                      # twice x+ W+ + x- W-
        scale = _safe_divide_into(relevance, denominator, 2 * EPS)
        out = scale @ weight
        out *= x
        part = scale @ abs_w
        del scale
        part *= abs_x
        out += part
        return out


class ZPlusSeparateRule(LinearRule):
    """alpha=1, beta=0 with separate denominators for the two parts (plain LRP)."""

    def __call__(self, x, weight, relevance, product=None):
        pos_w, neg_w = weight.clamp(min=0), weight.clamp(max=0)
        pos_x, neg_x = x.clamp(min=0), x.clamp(max=0)
        pos_scale = safe_divide(relevance, pos_x @ pos_w.mT)
        neg_scale = safe_divide(relevance, neg_x @ neg_w.mT)
        return pos_x * (pos_scale @ pos_w) + neg_x * (neg_scale @ neg_w)


class AddRule:
    """Relevance of the two summands of ``a + b``: split in proportion to them.

    ``split`` and ``rescale`` are the rule's two stages, for a caller that splits a tensor in
    parts and rescales once from the parts' summed totals (`oprules.attention` by head slices)."""

    def split(self, a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor):
        scale = safe_divide(relevance, a + b)
        return a * scale, b * scale

    def rescale(self, sum_a: torch.Tensor, sum_b: torch.Tensor, total: torch.Tensor):
        """Per-sample factors for the split's two parts from their totals and the output's
        (``[B, 1, ...]``); None: the split stands."""
        return None

    def __call__(self, a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor):
        return self.split(a, b, relevance)


class NormalizedAddRule(AddRule):
    """Split proportionally, then rescale each branch so its total is its share of the
    output's total, shares given by the branches' absolute sums (the paper's residual rule)."""

    def rescale(self, sum_a, sum_b, total):
        abs_total = sum_a.abs() + sum_b.abs()
        return (safe_divide(safe_divide(sum_a.abs(), abs_total) * total, sum_a),
                safe_divide(safe_divide(sum_b.abs(), abs_total) * total, sum_b))

    def __call__(self, a, b, relevance):
        rel_a, rel_b = self.split(a, b, relevance)
        factor_a, factor_b = self.rescale(per_sample_sum(rel_a), per_sample_sum(rel_b), per_sample_sum(relevance))
        return rel_a * factor_a, rel_b * factor_b


def clone_rule(x: torch.Tensor, *relevances: torch.Tensor) -> torch.Tensor:
    """A tensor used by several consumers collects their relevances (the reference's Clone)."""
    scale = safe_divide(relevances[0], x)
    for rel in relevances[1:]:
        scale = scale + safe_divide(rel, x)
    return x * scale


def select_rule(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance of a selected slice ``x`` of a larger tensor (pooling a token)."""
    return x * safe_divide(relevance, x)


def matmul_rule(left: torch.Tensor, right: torch.Tensor, relevance: torch.Tensor):
    """Relevance of both factors of ``left @ right`` by gradient x input, each halved.

    Each factor alone would receive the full relevance, so the two are halved to share it.
    """
    scale = _safe_divide_into(relevance, left @ right)
    # in place on the fresh products (the same operations): attention-sized temporaries are few
    left_share = (scale @ right.transpose(-1, -2)).mul_(left).div_(2)
    right_share = (left.transpose(-1, -2) @ scale).mul_(right).div_(2)
    return left_share, right_share


def bounded_input_rule(x_patches: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                       low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """z^B rule for the first layer, whose inputs lie in ``[low, high]`` (per sample).

    ``x_patches`` [B, P, K] are the flattened patches, ``weight`` [D, K]. A sample whose input
    is constant has no usable bounds; it falls back to the plain z-rule instead of dividing
    by a rounding residue.
    """
    constant = (high == low).reshape(-1, 1, 1)
    low = torch.where(constant, torch.zeros_like(low.reshape(-1, 1, 1)), low.reshape(-1, 1, 1))
    high = torch.where(constant, torch.zeros_like(high.reshape(-1, 1, 1)), high.reshape(-1, 1, 1))
    pos_w, neg_w = weight.clamp(min=0), weight.clamp(max=0)
    z = x_patches @ weight.T - low * pos_w.sum(dim=1) - high * neg_w.sum(dim=1)
    scale = safe_divide(relevance, z)
    return x_patches * (scale @ weight) - low * (scale @ pos_w) - high * (scale @ neg_w)


@dataclass(frozen=True)
class Preset:
    """How the authors' code treats the structures in which their vision and text models differ.

    Parameters
    ----------
    name : str
        ``"vision"`` or ``"text"`` (the keys of `PRESETS`, named by `registry.Family.preset`).
    projection_fork : str
        The query, key and value projections of one input are one fused layer in the vision
        code (their relevances are summed, ``"sum"``) and three layers behind a ``Clone`` in
        the text code (``"clone"``).
    attention_mask : str
        The text code adds the mask to the scores and splits relevance between them with the
        addition rule (``"add"``); without padding (vision) a mask is ignored (``"ignore"``).
    """

    name: str
    projection_fork: str = "sum"
    attention_mask: str = "ignore"


PRESETS = {"vision": Preset("vision", "sum", "ignore"), "text": Preset("text", "clone", "add")}


@dataclass(frozen=True)
class RuleSet:
    """The rules used for one explanation (``explain(..., rules=name)``).

    Parameters
    ----------
    name : str
        The name methods' ``rules`` option selects it by (`RULE_SETS`).
    linear : LinearRule
        The numerical rule for linear layers (z+ with one shared denominator or two separate ones).
    add : AddRule
        The numerical rule for additions of two data tensors (residual connections).
    ops : mapping of str to callable
        Op kind (`graph` assigns one to each operation) -> rule ``(ctx, relevance) -> list``
        returning one relevance per data input of the step (`oprules`). An operation on the
        relevance path whose kind has no entry raises `UnsupportedModelError`.
    """

    name: str
    linear: LinearRule
    add: AddRule
    ops: Mapping[str, Callable] = field(default_factory=dict, compare=False)


from .oprules import CHEFER_OPS  # noqa: E402  (the op rules use the numerical rules above)

PAPER = RuleSet("paper", ZPlusSharedRule(), NormalizedAddRule(), CHEFER_OPS)
PLAIN = RuleSet("plain", ZPlusSeparateRule(), AddRule(), CHEFER_OPS)
RULE_SETS = {PAPER.name: PAPER, PLAIN.name: PLAIN}


def get_rule_set(name: str | RuleSet) -> RuleSet:
    """The rule set called ``name`` (``"paper"`` or ``"plain"``); a `RuleSet` is returned as is.

    Parameters
    ----------
    name : str or RuleSet

    Returns
    -------
    RuleSet

    Raises
    ------
    OptionError
        For an unknown name (the message lists the known ones).
    """
    if isinstance(name, RuleSet):
        return name
    try:
        return RULE_SETS[name]
    except KeyError:
        raise OptionError(f"unknown rules {name!r}; choose one of {sorted(RULE_SETS)}") from None
