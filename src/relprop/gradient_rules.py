"""LRP as a modified gradient: the rule sets of AttnLRP and CP-LRP.

AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022) are LRP rules whose
relevance equals ``input * gradient`` once the backward pass of a few operations is changed;
LXT, the AttnLRP authors' library, computes them so (its "efficient" mode), in one backward
pass. relprop does the same on the model's exported graph: the engine's forward pass applies,
per op kind, the entry of a table below (a *wrapper*: the operation as it is, with its backward
changed), autograd takes the gradient of the explained score at the input point, and the
relevance there is ``value * gradient``. The tables and what each entry does:

* Linear layers, additions, routing, selections, means, masks, embeddings: unchanged (the
  epsilon rule with epsilon -> 0; a bias absorbs its share, as in LXT — with
  ``biases="redistribute"`` a linear layer's bias keeps none: its share goes to the inputs in
  proportion to ``|x_i w_ji|``).
* Statistics of the data (a norm's variance, 1/sqrt(var)): held constant, so a LayerNorm or
  RMSNorm passes relevance by the identity rule; ``layer_norm``/``rms_norm`` ops are recomputed
  with their standard deviation held constant.
* Element-wise activations (one ATen op, or a region `graph` recognised as one): the identity
  rule, backward ``g * y / (x + 1e-10)`` (LXT's implicit identity).
* Products of two tensors that both carry relevance (q·kᵀ, A·v, the gate of a gated MLP):
  the uniform rule, each factor gets half (the gradient is halved).
* Softmax: the AttnLRP rule (Prop. 3.1) is its plain gradient times input. SDPA: the same
  through the fused kernel, with the two products' halvings put on q, k (¼) and v (½).
* CP-LRP: the attention probabilities are constant (no relevance to q and k; A·v is then
  linear in v), and so is the activated gate of a gated MLP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .engine import lean_sdpa_arguments
from .errors import OptionError, UnsupportedModelError

aten = torch.ops.aten

IDENTITY_EPSILON = 1e-10     # LXT's stabiliser of y / x in the implicit identity rule


class _ScaleGradient(torch.autograd.Function):
    """``x`` forward; backward multiplies the gradient by a fixed ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _ImplicitIdentity(torch.autograd.Function):
    """An activation ``y = compute()`` as a function of its input ``x`` for autograd: backward
    ``g * y / (x + eps)``. ``compute`` runs inside ``forward`` (no autograd), so the op's own
    backward node, which would keep ``x`` alive until the backward pass, is never built: only
    the ratio is saved, as in LXT."""

    @staticmethod
    def forward(ctx, x, compute):
        y = compute()
        ctx.save_for_backward(y / (x + IDENTITY_EPSILON))
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None


def scale_gradient(x: torch.Tensor, factor) -> torch.Tensor:
    return _ScaleGradient.apply(x, factor) if x.requires_grad else x


@dataclass
class Call:
    """One step as a wrapper sees it: its op, its arguments (values), and which of them carry
    relevance (``carries[i]``: positional argument i is a tensor that requires grad)."""

    step: Any
    args: list
    kwargs: dict
    kinds: Callable[[int], Any]          # positional argument -> kind of the step that made it
    source: Any = None                   # the value of the step's (first) data input

    def run(self, args=None, kwargs=None):
        return self.step.target(*(self.args if args is None else args), **(self.kwargs if kwargs is None else kwargs))

    def carrying(self) -> list[int]:
        return [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor) and a.requires_grad]


Wrapper = Callable[[Call], Any]


def plain(call: Call):
    return call.run()


def implicit_identity(call: Call):
    """Identity rule for an element-wise activation of one tensor (or a region of them)."""
    source = call.source
    if source is None or not source.requires_grad:
        return call.run()
    return _ImplicitIdentity.apply(source, call.run)


def uniform_product(call: Call):
    """Two factors with relevance each get half of the product's (the uniform rule)."""
    out = call.run()
    return scale_gradient(out, 0.5) if len(call.carrying()) >= 2 else out


def constant_gate(call: Call):
    """CP-LRP: in a product of two relevance-carrying factors, an activation's output (the gate
    of a gated MLP) is held constant; other products are split uniformly."""
    carrying = call.carrying()
    if len(carrying) < 2:
        return call.run()
    gates = [i for i in carrying if call.kinds(i) == "activation"]
    if len(gates) == 1:
        args = list(call.args)
        args[gates[0]] = args[gates[0]].detach()
        return call.run(args)
    return uniform_product(call)


def _norm_with_constant_scale(call: Call):
    """LayerNorm / RMSNorm recomputed with the standard deviation held constant (identity rule)."""
    target = call.step.target
    if target in (aten.layer_norm.default, aten.native_layer_norm.default):
        x, shape, weight, bias = (list(call.args) + [None, None])[:4]
        eps = call.args[4] if len(call.args) > 4 else call.kwargs.get("eps", 1e-5)
        dims = tuple(range(-len(shape), 0))
        centred = x - x.mean(dim=dims, keepdim=True)
        std = (centred.pow(2).mean(dim=dims, keepdim=True) + eps).sqrt()
        y = centred / std.detach()
        y = y * weight if weight is not None else y
        y = y + bias if bias is not None else y
        if target is aten.native_layer_norm.default:
            _, mean, rstd = call.run()
            return y, mean, rstd
        return y
    if target is aten.rms_norm.default:
        x, shape = call.args[0], call.args[1]
        weight = call.args[2] if len(call.args) > 2 else call.kwargs.get("weight")
        eps = call.args[3] if len(call.args) > 3 else call.kwargs.get("eps")
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        dims = tuple(range(-len(shape), 0))
        y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps).detach()
        return y * weight if weight is not None else y
    raise UnsupportedModelError(f"no AttnLRP/CP-LRP rule for the normalisation {call.step.where()}")


def refuse_data_division(call: Call):
    if 1 in call.carrying():                 # the divisor carries relevance
        raise UnsupportedModelError(f"no AttnLRP/CP-LRP rule for {call.step.where()}: a division by a tensor "
                                    "that carries relevance")
    return call.run()


def _sdpa(call: Call, q_factor, v_factor, constant_scores: bool):
    q, k, v = call.args[:3]
    if constant_scores:
        q, k = q.detach(), k.detach()
    else:
        q, k = scale_gradient(q, q_factor), scale_gradient(k, q_factor)
    v = scale_gradient(v, v_factor)
    kwargs = dict(call.kwargs)
    kwargs.pop("dropout_p", None)
    args = [q, k, v] + [0.0 if i == 4 else a for i, a in enumerate(call.args[3:], start=3)]
    return call.run(*lean_sdpa_arguments(args, kwargs))


def attnlrp_attention(call: Call):
    """SDPA: q·kᵀ and A·v each split uniformly: q, k get ¼ (½ of A's half), v gets ½."""
    return _sdpa(call, 0.25, 0.5, constant_scores=False)


def cp_attention(call: Call):
    """CP-LRP: no relevance through the attention probabilities; A·v is linear in v."""
    return _sdpa(call, 1.0, 1.0, constant_scores=True)


def constant_probabilities(call: Call):
    return call.run().detach()


_UNCHANGED = ("route", "pool", "linear", "addmm", "conv", "add", "mask", "copy", "dropout", "embedding")

ATTNLRP_OPS: dict[str, Wrapper] = {
    **{kind: plain for kind in _UNCHANGED},
    "norm": _norm_with_constant_scale, "activation": implicit_identity, "softmax": plain,
    "mul": uniform_product, "matmul": uniform_product, "einsum": uniform_product, "baddbmm": uniform_product,
    "div": refuse_data_division, "attention": attnlrp_attention,
}
CP_LRP_OPS: dict[str, Wrapper] = {
    **ATTNLRP_OPS, "softmax": constant_probabilities, "attention": cp_attention, "mul": constant_gate,
}

BIASES = ("absorb", "redistribute")


class _BiasShareToInputs(torch.autograd.Function):
    """``out`` forward; backward also gives ``x`` the bias's share of the relevance, split in
    proportion to ``|x_i * w_ji|`` (the bias relevance ``b_j * g_j`` of output j)."""

    @staticmethod
    def forward(ctx, out, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors             # weight [out, in]
        magnitude = weight.abs()
        total = x.abs() @ magnitude.T
        share = torch.where(total > 0, grad * bias / torch.where(total > 0, total, torch.ones_like(total)),
                            torch.zeros_like(total))
        return grad, torch.sign(x) * (share @ magnitude), None, None


def _bias_redistributed(wrap: Wrapper, kind: str) -> Wrapper:
    """A linear layer's bias keeps no relevance: its share goes back to the inputs."""
    def redistributing(call: Call):
        out = wrap(call)
        if kind == "linear":
            x, weight, bias = (list(call.args) + [None])[:3]
        else:                                   # addmm(bias, x, weight [in, out])
            bias, x, weight = call.args[:3]
            weight = weight.T if isinstance(weight, torch.Tensor) else weight
        if not isinstance(bias, torch.Tensor) or not isinstance(x, torch.Tensor) or not x.requires_grad:
            return out
        return _BiasShareToInputs.apply(out, x, weight.detach(), bias.detach())
    return redistributing


@dataclass(frozen=True)
class GradientRuleSet:
    """A rule set applied as a modified backward pass (see the module docstring).

    Parameters
    ----------
    name : str
        The method that uses it (``"attnlrp"``, ``"cp_lrp"``).
    ops : mapping of str to callable
        Op kind -> wrapper ``(Call) -> output``. A data operation whose kind has no entry
        raises `UnsupportedModelError`.
    """

    name: str
    ops: Mapping[str, Wrapper] = field(compare=False)

    def wrapper(self, step, biases: str = "absorb") -> Wrapper:
        wrap = self.ops.get(step.kind) if step.kind else None
        if wrap is None:
            raise UnsupportedModelError(
                f"no {self.name} rule for {step.target} ({step.where()}); relprop does not pass relevance "
                "through an operation silently. See relprop.families(); to add a rule, see CONTRIBUTING.md")
        if biases == "redistribute" and step.kind in ("linear", "addmm"):
            return _bias_redistributed(wrap, step.kind)
        return wrap


ATTNLRP = GradientRuleSet("attnlrp", ATTNLRP_OPS)
CP_LRP = GradientRuleSet("cp_lrp", CP_LRP_OPS)
GRADIENT_RULE_SETS = {ATTNLRP.name: ATTNLRP, CP_LRP.name: CP_LRP}


def get_gradient_rule_set(name: str) -> GradientRuleSet:
    try:
        return GRADIENT_RULE_SETS[name]
    except KeyError:
        raise OptionError(f"unknown gradient rule set {name!r}; one of {sorted(GRADIENT_RULE_SETS)}") from None


def check_biases(biases: Any) -> str:
    if biases not in BIASES:
        raise OptionError(f"biases must be one of {BIASES}, got {biases!r}")
    return biases

