"""Runs a `Program` (the model's exported graph): forward, attention gradients, relevance.

* The forward pass evaluates the graph's ATen operations on the model's current weights, in
  the compute dtype; attention (SDPA) is expanded so that its probabilities A exist as tensors.
* Autograd tracks the computation from the lowest attention whose gradient is needed only.
* Relevance propagation walks the graph backwards, applying the rule set's rule for each
  operation's kind, and stops at the lowest attention whose relevance is needed unless
  relevance at the input is wanted. Values no rule needs are freed as the forward goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .errors import UnsupportedModelError
from .graph import Program, Ref, Step

aten = torch.ops.aten


@dataclass
class Pass:
    """What one forward pass left for the gradients and the relevance propagation."""

    program: Program
    values: list                                  # per step (None once freed)
    shapes: list                                  # per step: the output's shape (tensors)
    outputs: list                                 # flat model outputs
    attention: list[Optional[torch.Tensor]]       # per attention site: A [B, H, N, N] (None: fused)
    bias: dict[int, torch.Tensor] = field(default_factory=dict)   # site step -> additive mask of its scores
    site_of_step: dict[int, int] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    # fused attention (`forward(..., fused_attention=True)`): A is not kept (None in `attention`),
    # the SDPA outputs are, for the gradients ∇A = ∇O · Vᵀ
    attention_out: dict[int, torch.Tensor] = field(default_factory=dict)


    def release_graph(self) -> None:
        """Detach every kept value once the gradients are taken: otherwise their autograd
        history would keep the whole backward graph (and its saved tensors) alive during the
        relevance propagation."""
        self.values = [v.detach() if isinstance(v, torch.Tensor) and v.requires_grad else v for v in self.values]
        self.attention = [a.detach() if a is not None else None for a in self.attention]
        self.attention_out = {site: o.detach() for site, o in self.attention_out.items()}
        self.outputs = [o.detach() if isinstance(o, torch.Tensor) else o for o in self.outputs]


def _resolve(obj, values):
    if isinstance(obj, Ref):
        return values[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(o, values) for o in obj)
    if isinstance(obj, dict):
        return {k: _resolve(v, values) for k, v in obj.items()}
    return obj


def _in_dtype(obj, dtype):
    """Floating dtypes baked into the graph (casts, ``arange(dtype=float32)``) become the compute
    dtype: every value of an explanation is in one dtype, so a float64 explanation also computes
    in float64 what the model itself computes in float32 (an eager softmax, Llama's RMSNorm and
    rotary tables)."""
    if isinstance(obj, torch.dtype):
        return dtype if obj.is_floating_point else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_in_dtype(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _in_dtype(v, dtype) for k, v in obj.items()}
    return obj


def attention_bias(mask: Optional[torch.Tensor], is_causal: bool, q: torch.Tensor, k: torch.Tensor):
    """SDPA's mask as an additive bias on the scores (bool: 0 kept, the dtype's minimum masked)."""
    bias = None
    if is_causal:
        n, s = q.shape[-2], k.shape[-2]
        keep = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)
        mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool else mask)
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
        else:
            bias = mask.to(q.dtype)
    return bias


# a boolean mask -> {dtype: what a fused SDPA call gets instead}; keyed by the mask tensor itself,
# which every block of a pass shares (the graph computes the mask once)
_LEAN_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_CAUSAL = "causal"


def lean_sdpa_arguments(args: list, kwargs: dict) -> tuple[list, dict]:
    """A fused SDPA call's arguments with a boolean mask made cheap to keep for the backward pass.

    SDPA turns a boolean mask into a float one (-inf where masked) at every call, and autograd
    saves that copy for each block: [B, 1, N, N] floats per block, 64 MiB each at 4,096 tokens.
    Here the conversion happens once per mask (the same -inf/0 values, shared by all blocks); a mask
    that keeps everything (an encoder's unpadded batch) is dropped, and one that is exactly causal
    (a decoder's unpadded batch) becomes ``is_causal=True``, as ``transformers`` passes them outside
    an export. Masked scores are -inf either way: the same result."""
    args, kwargs = list(args), dict(kwargs)
    in_args = len(args) > 3
    mask = args[3] if in_args else kwargs.get("attn_mask")
    is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or is_causal:
        return args, kwargs
    q = args[0]
    lean = _LEAN_MASKS.setdefault(mask, {})
    if q.dtype not in lean:
        n, s = mask.shape[-2:]
        if bool(mask.all()):
            lean[q.dtype] = None
        elif n == s == q.shape[-2] and torch.equal(
                mask, torch.ones(n, s, dtype=torch.bool, device=mask.device).tril().expand_as(mask)):
            lean[q.dtype] = _CAUSAL
        else:
            lean[q.dtype] = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    replacement = lean[q.dtype]
    if replacement is _CAUSAL:
        replacement = None
        if len(args) > 5:
            args[5] = True
        else:
            kwargs["is_causal"] = True
    if in_args:
        args[3] = replacement
    else:
        kwargs["attn_mask"] = replacement
    return args, kwargs


def head_groups(q: torch.Tensor, k: torch.Tensor, enable_gqa) -> int:
    """Query heads per key-value head of an SDPA call (grouped-query attention), else 1."""
    return q.shape[-3] // k.shape[-3] if enable_gqa else 1


def repeat_heads(k: torch.Tensor, groups: int) -> torch.Tensor:
    return k if groups == 1 else k.repeat_interleave(groups, dim=-3)


def kv_heads_of(x, start: int, stop: int, groups: int):
    """The key (or value) heads of query heads start..stop, one per query head: [.., stop - start, S, D]."""
    if groups == 1:
        return x[..., start:stop, :, :]
    return x.index_select(-3, torch.arange(start, stop, device=x.device) // groups)


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
               grad_leaf=False):
    """SDPA with explicit probabilities (dropout is an inference no-op)."""
    groups = head_groups(q, k, enable_gqa)
    k, v = repeat_heads(k, groups), repeat_heads(v, groups)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    bias = attention_bias(attn_mask, is_causal, q, k)
    if bias is not None:
        scores = scores + bias
    probabilities = scores.softmax(dim=-1)
    if grad_leaf:
        probabilities = probabilities.detach().requires_grad_(True)
    return probabilities @ v, probabilities, bias


def forward(program: Program, inputs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
            dtype: torch.dtype, *, keep: frozenset = frozenset(), grad_site: Optional[int] = None,
            gradient_rules=None, biases: str = "absorb", leaf: Optional[int] = None,
            fused_attention: bool = False) -> Pass:
    """Evaluate the graph. ``keep``: steps whose values the relevance rules read later.
    ``grad_site``: position of the lowest attention site whose gradient is needed (autograd
    tracks the computation from its probabilities on).

    ``gradient_rules`` (a `gradient_rules.GradientRuleSet`): LRP as a modified gradient. Every
    data operation runs through the rule set's wrapper for its kind, statistics are held
    constant, attention stays the model's fused SDPA, and autograd tracks the computation from
    step ``leaf`` (the input point) on; the gradient there times its value is the relevance.

    ``fused_attention``: SDPA runs fused and its probabilities are not kept (the relevance rule
    recomputes a block's A when it reaches it; ∇A follows from the output's gradient), so no
    [B, H, N, N] tensor of any block outlives the forward; autograd then tracks from the SDPA
    output of ``grad_site`` on."""
    steps = program.steps
    values: list[Any] = [None] * len(steps)
    shapes: list[Any] = [None] * len(steps)
    for index, what, name in program.inputs:
        if what == "input":
            values[index] = inputs[name]
        elif what == "constant":
            values[index] = program.constants[name]
        else:
            values[index] = weights[name]
    attention: list[Optional[torch.Tensor]] = []
    attention_out: dict[int, torch.Tensor] = {}
    bias: dict[int, Any] = {}
    site_of_step: dict[int, int] = {}
    sites = {step: i for i, step in enumerate(program.attention_sites)}
    grad_step = None if grad_site is None else program.attention_sites[grad_site]
    for step in steps:
        if step.target is None:
            shapes[step.index] = _shape(values[step.index])
            continue
        if step.kind == "meta":
            continue
        args = _in_dtype(_resolve(step.args, values), dtype)
        kwargs = _in_dtype(_resolve(step.kwargs, values), dtype)
        if gradient_rules is not None:
            out = _modified(step, args, kwargs, values, steps, gradient_rules, biases)
            if step.index == leaf:
                out = out.detach().requires_grad_(True)
            values[step.index] = out
            shapes[step.index] = _shape(out)
            _free(step, values, keep, steps)
            continue
        if step.kind == "attention" and fused_attention:
            sdpa_args = [0.0 if position == 4 else a for position, a in enumerate(args)]     # no dropout
            sdpa_args, sdpa_kwargs = lean_sdpa_arguments(sdpa_args, kwargs if len(args) > 4 else {**kwargs, "dropout_p": 0.0})
            out = step.target(*sdpa_args, **sdpa_kwargs)
            if step.index == grad_step:
                out = out.detach().requires_grad_(True)
            probabilities = None
            attention_out[len(attention)] = out
        elif step.kind == "attention":
            out, probabilities, site_bias = _attention(*args, **kwargs, grad_leaf=step.index == grad_step)
            if site_bias is not None:
                bias[step.index] = site_bias
        else:
            out = step.target(*args, **kwargs)
            probabilities = out
            if step.index == grad_step:     # an eager softmax: the gradient leaf is its output
                out = probabilities = out.detach().requires_grad_(True)
        if step.index in sites:
            site_of_step[step.index] = len(attention)
            attention.append(probabilities)
        values[step.index] = out
        shapes[step.index] = _shape(out)
        _free(step, values, keep, steps)
    outputs = [values[i] if i is not None else program.constant_outputs.get(n)
               for n, i in enumerate(program.outputs)]
    return Pass(program, values, shapes, outputs, attention, bias, site_of_step, dtype, attention_out)


def _modified(step: Step, args, kwargs, values: list, steps: list[Step], gradient_rules, biases: str):
    """One step under a gradient rule set: statistics constant, data operations wrapped."""
    if not step.data:
        return step.target(*args, **kwargs)
    if step.statistic:
        out = step.target(*args, **kwargs)
        return out.detach() if isinstance(out, torch.Tensor) else out
    from .gradient_rules import Call

    def kind_of(position: int):
        arg = step.args[position] if position < len(step.args) else None
        return steps[arg.index].kind if isinstance(arg, Ref) else None

    source = values[step.data_inputs[0]] if step.data_inputs else None
    call = Call(step, list(args), kwargs, kind_of, source)
    return gradient_rules.wrapper(step, biases)(call)


def _shape(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(_shape(v) for v in value)
    return None


def _free(step: Step, values: list, keep: frozenset, steps: list[Step]) -> None:
    """Drop values read for the last time (unless a rule needs them; non-data values are small)."""
    def release(ref: Ref):
        source = steps[ref.index]
        if source.last_use == step.index and ref.index not in keep and source.data and source.target is not None:
            values[ref.index] = None

    from .graph import _walk
    _walk((step.args, step.kwargs), release)


@dataclass
class Relevance:
    attention: dict[int, torch.Tensor] = field(default_factory=dict)   # site -> R_A [B, H, N, N]
    at: dict[int, torch.Tensor] = field(default_factory=dict)          # step -> relevance of its value
    # site, R_A, heads -> None: consumes each block's R_A as the propagation reaches it (a method
    # that reduces it at once); then no block's R_A is kept. ``heads``: (start, stop, total) when
    # R_A comes a slice of heads at a time (`oprules.ATTENTION_SLICE_BYTES`), else None
    on_attention: Optional[Callable[[int, torch.Tensor, Optional[tuple[int, int, int]]], None]] = None

    def record(self, site: int, relevance: torch.Tensor, heads: Optional[tuple[int, int, int]] = None) -> None:
        if self.on_attention is not None:
            self.on_attention(site, relevance, heads)
        elif heads is not None:
            raise RuntimeError("internal error: R_A of a slice of heads is only streamed, never kept")
        else:
            self.attention[site] = relevance


class Context:
    """What a rule sees of one step: its arguments' values and shapes, its output."""

    def __init__(self, fwd: Pass, step: Step, rules, preset, relevance: Relevance, stop: bool):
        self.fwd, self.step, self.rules, self.preset, self.relevance = fwd, step, rules, preset, relevance
        self.stop = stop            # the lowest attention needed: its inputs get no relevance

    def value(self, index: int):
        value = self.fwd.values[index]
        if value is None and self.fwd.program.steps[index].target is not None:
            raise RuntimeError(f"internal error: the value of {self.fwd.program.steps[index].where()} was freed")
        return value

    @property
    def out(self):
        return self.value(self.step.index)

    def shape(self, index: int):
        return self.fwd.shapes[index]

    def args(self):
        return _in_dtype(_resolve(self.step.args, self.fwd.values), self.fwd.dtype)

    def kwargs(self):
        return _in_dtype(_resolve(self.step.kwargs, self.fwd.values), self.fwd.dtype)

    def arg_index(self, position: int) -> Optional[int]:
        arg = self.step.args[position] if position < len(self.step.args) else None
        return arg.index if isinstance(arg, Ref) else None


def propagate(fwd: Pass, start: dict[int, torch.Tensor], rules, preset, *, lowest_site: Optional[int],
              collect: frozenset = frozenset(),
              on_attention: Optional[Callable[[int, torch.Tensor, Optional[tuple[int, int, int]]], None]] = None
              ) -> Relevance:
    """LRP from ``start`` (output step -> relevance) backwards through the graph.

    Stops after the attention site ``lowest_site`` (None: go on to the inputs); the relevance
    of every step in ``collect`` is returned in ``Relevance.at``. ``on_attention(site, R_A)``:
    each attention's relevance is handed over as it is reached instead of kept.
    """
    steps = fwd.program.steps
    pending: dict[int, list] = {}
    for index, rel in start.items():
        pending.setdefault(index, []).append((None, rel))
    result = Relevance(on_attention=on_attention)
    lowest_step = None if lowest_site is None else fwd.program.attention_sites[lowest_site]
    for index in range(len(steps) - 1, -1, -1):
        contributions = pending.pop(index, None)
        if contributions is None:
            continue
        step = steps[index]
        relevance = combine(fwd, step, contributions, rules, preset)
        if index in collect:
            result.at[index] = relevance
        if not step.data_inputs:
            continue
        rule = rules.ops.get(step.kind) if step.kind else None
        if rule is None:
            raise UnsupportedModelError(
                f"no relevance rule for {step.target} ({step.where()}) in the {rules.name!r} rule set; "
                f"relprop does not pass relevance through an operation silently. Supported families: "
                f"see relprop.families(); to add a rule, see CONTRIBUTING.md")
        context = Context(fwd, step, rules, preset, result, stop=index == lowest_step and not collect)
        parts = rule(context, relevance)
        for source, part in zip(step.data_inputs, parts):
            if part is not None:
                pending.setdefault(source, []).append((step, part))
        if index != lowest_step or collect:
            fwd.values[index] = None if step.data else fwd.values[index]
        if index == lowest_step and not collect:
            break
    return result


def combine(fwd: Pass, step: Step, contributions: list, rules, preset) -> Any:
    """The relevance of a value from its consumers' shares.

    A value several consumers read (a fork) collects their shares with the clone rule of the
    authors' code; the shares of several projections of one input (query, key, value) are
    first combined by the preset: summed where the authors use one fused layer.
    """
    from .rules import clone_rule

    if isinstance(fwd.shapes[step.index], tuple) and fwd.shapes[step.index] and isinstance(
            fwd.shapes[step.index][0], tuple):                       # a multi-output op: shares per output
        parts: dict[int, torch.Tensor] = {}
        for _, (position, rel) in contributions:
            parts[position] = rel if position not in parts else parts[position] + rel
        return parts
    if len(contributions) == 1:
        return contributions[0][1]
    # in the forward order of the consumers (the authors' order of summation)
    contributions = sorted(contributions, key=lambda c: -1 if c[0] is None else c[0].index)
    projections = [rel for consumer, rel in contributions if consumer is not None and consumer.kind == "linear"]
    others = [rel for consumer, rel in contributions if consumer is None or consumer.kind != "linear"]
    value = fwd.values[step.index]
    if len(projections) >= 2:
        joined = sum(projections[1:], projections[0]) if preset.projection_fork == "sum" else clone_rule(value, *projections)
        others.append(joined)
    else:
        others.extend(projections)
    if len(others) == 1:
        return others[0]
    return clone_rule(value, *others)


def forks(program: Program) -> set[int]:
    """Data steps that several consumers read: their values are needed by `combine`."""
    return {s.index for s in program.steps if len(s.consumers) > 1}
