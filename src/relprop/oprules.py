"""Relevance rules per operation kind: the entries of a rule set's table.

Each rule takes a `engine.Context` (the step, its arguments' values, its output) and the
relevance of the step's output, and returns the relevance of each of the step's data inputs
(``step.data_inputs``, in order; None for no relevance). The numerical rules they apply
(linear, add, products) live in `rules`.

Structures beyond BERT's, and how relevance crosses them (no rule of its own is needed):

* Rotary position embeddings (Llama, ModernBERT): ``x * cos + rotate_half(x) * sin``. cos/sin
  are built from positions only (not data), so each product is a scaling of the data (`mul`:
  unchanged), ``neg`` is a sign (unchanged), the slices and the concatenation of
  ``rotate_half`` route, and the sum of the two data terms is the rule set's addition. With
  the plain rules this is exactly the z-rule of the linear map ``x -> y``.
* Gated MLPs (GeGLU, SwiGLU): ``act(a) * b`` multiplies two data tensors: each factor gets half
  (`mul`); the ``chunk`` that splits the fused projection routes.
* ``masked_fill`` on the attention scores (DeBERTa): routed; kept entries pass unchanged,
  filled entries (a constant) get none. Their relevance is ~0 anyway, as their probability is 0.
* In-place operations on data (DeBERTa's ``score += p2c``) run out of place (`graph`), so a
  rule sees its inputs as they were before the operation.
* DeBERTa's disentangled attention scores ``(q·kᵀ + q·P_k[δ]ᵀ + k·P_q[δ]ᵀ) / sqrt(3d)``: the
  relative-position embeddings P_k, P_q (projections of ``rel_embeddings``) do not depend on the
  tokens, but the two position terms do, through q and k. The sum is split over the three
  terms by the rule set's addition rule (nothing is dropped: a position term's share belongs to
  its token factor); ``q·kᵀ`` gives each factor half (`matmul`); ``q·P_kᵀ`` and ``k·P_qᵀ`` give
  their whole share to q or k by the rule set's linear rule with P as the weight (as ``W_q``
  in ``x·W_qᵀ``); the ``gather`` by relative distance that picks each score from the [S, 2k]
  products is a selection (`pool`: gradient x input, which routes each score's relevance to the
  entry it was picked from).
"""
from __future__ import annotations

import inspect
import operator
from typing import Callable, Optional

import torch

from .engine import _attention, head_groups, kv_heads_of, repeat_heads
from .errors import UnsupportedModelError
from .graph import Ref
from .rules import bounded_input_rule, matmul_rule, per_sample_sum, safe_divide

aten = torch.ops.aten

OpRule = Callable[..., list]


def _unsupported(ctx, why: str):
    raise UnsupportedModelError(f"relprop cannot propagate relevance through {ctx.step.where()}: {why}")


def _positions(ctx) -> dict[int, list[int]]:
    """Data input step -> the positional arguments that hold it."""
    found: dict[int, list[int]] = {}
    for position, arg in enumerate(ctx.step.args):
        if isinstance(arg, Ref) and arg.index in ctx.step.data_inputs:
            found.setdefault(arg.index, []).append(position)
    return found


def identity(ctx, relevance):
    """Norms, activations, softmax, dropout, casts: the relevance passes unchanged."""
    if len(ctx.step.data_inputs) != 1:
        _unsupported(ctx, f"it has {len(ctx.step.data_inputs)} data inputs, the identity rule expects one")
    source = ctx.step.data_inputs[0]
    if ctx.shape(source) != tuple(relevance.shape):
        _unsupported(ctx, "its output's shape differs from its input's")
    return [relevance]


# -- routing ------------------------------------------------------------------------------------
def _inverse_permutation(dims):
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d % len(dims)] = i
    return inverse


def _vjp(ctx, relevance):
    """The operation's vector-Jacobian product at ``relevance`` (exact for a linear operation,
    so it is evaluated at zero inputs: no input value needs to be kept)."""
    leaves = {i: torch.zeros(ctx.shape(i), dtype=ctx.fwd.dtype, device=_device(relevance), requires_grad=True)
              for i in ctx.step.data_inputs}

    def substitute(obj):
        if isinstance(obj, Ref):
            return leaves[obj.index] if obj.index in leaves else ctx.fwd.values[obj.index]
        if isinstance(obj, (list, tuple)):
            return type(obj)(substitute(o) for o in obj)
        return obj

    from .engine import _in_dtype
    with torch.enable_grad():
        out = ctx.step.target(*_in_dtype(substitute(ctx.step.args), ctx.fwd.dtype),
                              **_in_dtype(ctx.step.kwargs, ctx.fwd.dtype))
        if isinstance(out, (list, tuple)):
            pairs = [(o, relevance.get(i)) for i, o in enumerate(out)]
            pairs = [(o, r) for o, r in pairs if r is not None]
            outs, grads = [o for o, _ in pairs], [r for _, r in pairs]
        else:
            outs, grads = [out], [relevance]
        found = torch.autograd.grad(outs, [leaves[i] for i in ctx.step.data_inputs], grads, allow_unused=True)
    return list(found)


def _device(relevance):
    if isinstance(relevance, dict):
        return next(iter(relevance.values())).device
    return relevance.device


def route(ctx, relevance):
    """Reshapes, transposes, slices, concatenations, ...: relevance goes where the values came from."""
    step, target = ctx.step, ctx.step.target
    if target is operator.getitem:
        return [(step.args[1], relevance)]
    if len(step.data_inputs) == 1 and not isinstance(relevance, dict):
        shape = ctx.shape(step.data_inputs[0])
        if target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                      aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                      aten.squeeze.default):
            return [relevance.reshape(shape)]
        if target is aten.transpose.int:
            return [relevance.transpose(step.args[1], step.args[2])]
        if target is aten.permute.default:
            return [relevance.permute(_inverse_permutation(step.args[1]))]
        if target is aten.expand.default:
            return [relevance.sum_to_size(shape)]
    if target is aten.cat.default and all(isinstance(a, Ref) for a in step.args[0]):
        dim = step.args[1] if len(step.args) > 1 else 0
        sizes = [ctx.shape(a.index)[dim] for a in step.args[0]]
        pieces = dict(zip([a.index for a in step.args[0]], relevance.split(sizes, dim=dim)))
        if len(pieces) == len(step.args[0]):        # each input once
            return [pieces[i] for i in step.data_inputs]
    return _vjp(ctx, relevance)


def pool(ctx, relevance):
    """Selections and averages: gradient x input, R_x = x * d(out)/dx^T (R / out), the authors'
    IndexSelect rule (pooling the [CLS] token)."""
    if len(ctx.step.data_inputs) != 1:
        _unsupported(ctx, "a pooling with several data inputs")
    source = ctx.step.data_inputs[0]
    scaled = safe_divide(relevance, ctx.out)
    if ctx.step.target is aten.select.int:
        spread = aten.select_backward(scaled, ctx.shape(source), ctx.step.args[1], ctx.step.args[2])
    else:
        spread = _vjp(ctx, scaled)[0]
    return [ctx.value(source) * spread]


# -- layers -------------------------------------------------------------------------------------
def linear(ctx, relevance):
    """z+ (the rule set's linear rule); the bias gets no relevance."""
    args = ctx.args()
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else ctx.kwargs().get("bias")
    if ctx.step.data_inputs != [ctx.arg_index(0)]:
        _unsupported(ctx, "a linear layer whose weight depends on the input")
    product = ctx.out if bias is None else ctx.out - bias
    return [_rows_with_relevance(ctx.rules.linear, x, weight, relevance, product)]


def _rows_with_relevance(rule, x, weight, relevance, product):
    """The linear rule on the rows (tokens) that hold relevance only, when they are few (a
    readout token's row in the last block): rows without relevance get none (the rule maps a
    zero row to a zero row), so the result is the same at a fraction of the cost."""
    if relevance.dim() < 3:
        return rule(x, weight, relevance, product)
    rows = relevance.reshape(-1, relevance.shape[-1])
    live = rows.ne(0).any(dim=1)
    count = int(live.sum())
    if count * 2 > live.numel():
        return rule(x, weight, relevance, product)
    index = live.nonzero().squeeze(1)
    flat_x = x.reshape(-1, x.shape[-1])
    out = flat_x.new_zeros(flat_x.shape)
    out[index] = rule(flat_x[index], weight, rows[index], product.reshape(-1, product.shape[-1])[index])
    return out.reshape(x.shape)


def addmm(ctx, relevance):
    """``bias + x @ W`` (a linear layer written with addmm)."""
    bias, x, weight = ctx.args()[:3]
    if ctx.step.data_inputs != [ctx.arg_index(1)]:
        _unsupported(ctx, "addmm whose bias or weight depends on the input")
    return [ctx.rules.linear(x, weight.T, relevance, ctx.out - bias)]


def conv(ctx, relevance):
    """A convolution on the model's input (a patch embedding): the z^B rule with the bounds of
    each input (its minimum and maximum); the bias gets no relevance."""
    args = ctx.args()
    x, weight = args[0], args[1]
    source = ctx.arg_index(0)
    if ctx.step.data_inputs != [source] or not _reads_model_input(ctx, source):
        _unsupported(ctx, "relprop propagates through a convolution only where it reads the model's input "
                          "(a patch embedding)")
    stride, padding, dilation = (list(args[i]) if len(args) > i else d for i, d in ((3, [1, 1]), (4, [0, 0]), (5, [1, 1])))
    groups = args[6] if len(args) > 6 else 1
    if weight.dim() != 4 or groups != 1 or any(padding) or any(d != 1 for d in dilation) or \
            list(weight.shape[-2:]) != list(stride):
        return _conv_bounded_general(ctx, x, weight, relevance, stride, padding, dilation, groups)
    # non-overlapping patches: the z^B rule on the unfolded patches (as the authors' code)
    patch = tuple(weight.shape[-2:])
    b = x.shape[0]
    unfolded = torch.nn.functional.unfold(x, patch, stride=patch).transpose(1, 2)
    rel = relevance.flatten(2).transpose(1, 2)
    low = x.reshape(b, -1).min(dim=1).values
    high = x.reshape(b, -1).max(dim=1).values
    rel_x = bounded_input_rule(unfolded, weight.flatten(1), rel, low, high)
    return [torch.nn.functional.fold(rel_x.transpose(1, 2), x.shape[-2:], patch, stride=patch)]


def _reads_model_input(ctx, index: int) -> bool:
    steps = ctx.fwd.program.steps
    while steps[index].kind == "copy" and len(steps[index].data_inputs) == 1:   # a cast of the input
        index = steps[index].data_inputs[0]
    return steps[index].target is None


def _conv_bounded_general(ctx, x, weight, relevance, stride, padding, dilation, groups):
    _unsupported(ctx, "a convolution that is not a non-overlapping patch embedding")


def add(ctx, relevance):
    """Two data tensors: the rule set's addition rule (the paper's: normalised residual split).
    Data plus a constant tensor (a position embedding): the same rule, the constant's share is
    dropped. Data plus a number: unchanged."""
    args = ctx.args()
    positions = _positions(ctx)
    a, b = args[0], args[1]
    if ctx.step.target is aten.sub.Tensor:
        b = -b
    alpha = ctx.kwargs().get("alpha", 1)
    if alpha != 1:
        b = b * alpha
    if not isinstance(b, torch.Tensor) or not isinstance(a, torch.Tensor):
        return [relevance]
    shape = relevance.shape
    rel_a, rel_b = ctx.rules.add(a.expand(shape), b.expand(shape), relevance)
    out = []
    for source in ctx.step.data_inputs:
        where = positions[source]
        parts = []
        if 0 in where:
            parts.append(rel_a.sum_to_size(a.shape) if a.shape != shape else rel_a)
        if 1 in where:
            parts.append(rel_b.sum_to_size(b.shape) if b.shape != shape else rel_b)
        out.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
    return out


def mul(ctx, relevance):
    """Scaling by a constant or a statistic (LayerScale, 1/sqrt(var)): unchanged. A product of two
    data tensors (a gate, x * sigmoid(x)): each factor gets half (the equal split)."""
    n = len(ctx.step.data_inputs)
    if n == 1:
        return identity_shaped(ctx, relevance)
    half = relevance / 2
    return [half.sum_to_size(ctx.shape(i)) for i in ctx.step.data_inputs]


def div(ctx, relevance):
    """Division by a constant or a statistic: unchanged."""
    if ctx.step.data_inputs != [ctx.arg_index(0)]:
        _unsupported(ctx, "a division by a tensor that depends on the input and is not a statistic")
    return identity_shaped(ctx, relevance)


def identity_shaped(ctx, relevance):
    source = ctx.step.data_inputs[0]
    shape = ctx.shape(source)
    return [relevance if tuple(relevance.shape) == shape else relevance.sum_to_size(shape)]


def matmul(ctx, relevance):
    """A product of two data tensors: gradient x input for each factor, halved (the authors' rule
    for A·V and Q·Kᵀ). A data tensor times a weight, or times a (batched) tensor that does not
    depend on the inputs: the rule set's linear rule, that tensor as the weight (DeBERTa's
    content-to-position term ``q @ P_kᵀ``: see the module's notes)."""
    left, right = ctx.args()[:2]
    sources = [ctx.arg_index(0), ctx.arg_index(1)]
    data = [s in ctx.step.data_inputs for s in sources]
    if all(data):
        rel_left, rel_right = matmul_rule(left, right, relevance)
        if sources[0] == sources[1]:
            return [rel_left + rel_right.transpose(-1, -2)]
        return [rel_left, rel_right]
    if data[0] and right.dim() >= 2:
        return [ctx.rules.linear(left, right.mT, relevance, ctx.out)]
    _unsupported(ctx, "a product of a constant and the data in this order")


#: the most bytes of one [B, heads, N, N] slice an attention rule makes at a time when it
#: recomputes A (fused forward, streaming method): a long context then holds a few such slices,
#: not a few tensors of all heads (2,048 tokens x 32 heads: 512 MiB each in float32)
ATTENTION_SLICE_BYTES = 128 * 2**20

_SDPA = inspect.signature(_attention)


def _head_slices(q, k) -> list[tuple[int, int]]:
    """Query-head ranges [start, stop) of at most `ATTENTION_SLICE_BYTES` each (at least one
    head), covering all heads. A range may split a group of grouped-query attention: each
    slice reads its query heads' own key-value heads (`kv_heads_of`)."""
    heads = q.shape[-3]
    per_head = q[..., :1, :, :1].numel() * k.shape[-2] * q.element_size()
    size = max(1, ATTENTION_SLICE_BYTES // max(per_head, 1))
    return [(start, min(start + size, heads)) for start in range(0, heads, size)]


def _of_heads(x, start: int, stop: int):
    """Heads start..stop of a [..., H, N, S] tensor; one broadcast over heads stays as it is."""
    if x is None or x.dim() < 3 or x.shape[-3] == 1:
        return x
    return x[..., start:stop, :, :]


def attention(ctx, relevance):
    """SDPA, expanded: R_A and R_V from A·V; R_A recorded; then, unless this is the lowest
    attention needed, the scores (through the mask by the preset) and Q·Kᵀ.

    When the forward ran SDPA fused and the method reduces each block's R_A at once, A is
    recomputed a slice of heads at a time (`ATTENTION_SLICE_BYTES`) and each slice's R_A is
    recorded with its head range: every head's rule is independent of the others'."""
    call = _SDPA.bind(*ctx.args(), **ctx.kwargs())
    call.apply_defaults()
    sdpa = call.arguments
    q, k, v = sdpa["q"], sdpa["k"], sdpa["v"]
    site = ctx.fwd.site_of_step[ctx.step.index]
    probabilities, bias = ctx.fwd.attention[site], ctx.fwd.bias.get(ctx.step.index)
    groups = head_groups(q, k, sdpa["enable_gqa"])
    if probabilities is not None or ctx.relevance.on_attention is None:
        if probabilities is None:           # a fused forward kept no A: recompute this block's
            _, probabilities, bias = _attention(**sdpa)
        rel_a, *parts = _attention_rule(ctx, q, k, v, probabilities.detach(), bias, groups, sdpa["scale"], relevance)
        ctx.relevance.record(site, rel_a)
        rel_q, rel_k, rel_v, mask_sums = parts
    else:
        sliced = []
        for start, stop in _head_slices(q, k):     # per query head; k's and v's summed per group below
            q_s = q[..., start:stop, :, :]
            k_s, v_s = kv_heads_of(k, start, stop, groups), kv_heads_of(v, start, stop, groups)
            _, probabilities, bias = _attention(**{**sdpa, "q": q_s, "k": k_s, "v": v_s, "enable_gqa": False,
                                                   "attn_mask": _of_heads(sdpa["attn_mask"], start, stop)})
            rel_a, *parts = _attention_rule(ctx, q_s, k_s, v_s, probabilities.detach(), bias, 1, sdpa["scale"],
                                            relevance[..., start:stop, :, :])
            del probabilities, bias
            whole = (start, stop) == (0, q.shape[-3])
            ctx.relevance.record(site, rel_a, heads=None if whole else (start, stop, q.shape[-3]))
            del rel_a
            sliced.append(parts)
        rel_q, rel_k, rel_v = (None if part[0] is None else torch.cat(part, dim=-3) for part in list(zip(*sliced))[:3])
        if groups > 1:      # per query head -> per key-value head, as _attention_rule sums a whole call's
            rel_k, rel_v = (None if r is None else r.unflatten(-3, (k.shape[-3], groups)).sum(dim=-3)
                            for r in (rel_k, rel_v))
        mask_sums = None if sliced[0][3] is None else sum(part[3] for part in sliced)
    if mask_sums is not None:       # the mask's addition rule, rescaled from all heads' totals at once
        factors = ctx.rules.add.rescale(*mask_sums)
        if factors is not None:
            rel_q, rel_k = rel_q * factors[0], rel_k * factors[0]
    rel = {ctx.arg_index(2): rel_v}
    for position, part in ((0, rel_q), (1, rel_k)):
        index = ctx.arg_index(position)
        if part is not None:
            rel[index] = part if index not in rel else rel[index] + part
    return [rel.get(i) for i in ctx.step.data_inputs]


def _attention_rule(ctx, q, k, v, probabilities, bias, groups: int, scale, relevance):
    """R_A and the relevance of q, k, v (k, v per key-value head; q, k None at the lowest
    attention needed) of one SDPA call or a slice of its heads; with a mask added to the
    scores (the text preset), q's and k's relevance before the addition rule's per-sample
    rescaling, and the totals that rescaling needs ([3, B, 1, 1, 1]: scores', mask's, output's),
    so that slices of heads rescale together."""
    k_full, v_full = repeat_heads(k, groups), repeat_heads(v, groups)
    rel_probabilities, rel_v = matmul_rule(probabilities, v_full, relevance)
    if groups > 1:
        rel_v = rel_v.unflatten(-3, (k.shape[-3], groups)).sum(dim=-3)
    if ctx.stop:
        return rel_probabilities, None, None, rel_v, None
    rel_scores, sums = rel_probabilities, None
    if bias is not None and ctx.preset.attention_mask == "add":
        scores = (q @ k_full.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        rel_scores, rel_mask = ctx.rules.add.split(scores, bias.expand_as(scores), rel_probabilities)
        sums = torch.stack([per_sample_sum(rel_scores), per_sample_sum(rel_mask), per_sample_sum(rel_probabilities)])
        del scores, rel_mask
    rel_q, rel_k_t = matmul_rule(q, k_full.transpose(-1, -2), rel_scores)
    rel_k = rel_k_t.transpose(-1, -2)
    if groups > 1:
        rel_k = rel_k.unflatten(-3, (k.shape[-3], groups)).sum(dim=-3)
    return rel_probabilities, rel_q, rel_k, rel_v, sums


def mask(ctx, relevance):
    """A mask or bias added to attention scores: split like an addition (the authors' text
    code) or passed unchanged to the scores (their vision code has no mask), by the preset."""
    if ctx.preset.attention_mask == "add":
        return add(ctx, relevance)
    return identity_shaped(ctx, relevance)


def softmax(ctx, relevance):
    """Softmax: unchanged (the authors' rule); on attention probabilities, R_A is recorded."""
    site = ctx.fwd.site_of_step.get(ctx.step.index)
    if site is not None:
        ctx.relevance.record(site, relevance)
        if ctx.stop:
            return [None]
    return identity(ctx, relevance)


#: the table shared by the paper's and the plain rule sets (they differ in `linear` and `add`)
CHEFER_OPS: dict[str, OpRule] = {
    "norm": identity, "activation": identity, "dropout": identity, "copy": identity, "softmax": softmax,
    "route": route, "pool": pool, "linear": linear, "addmm": addmm, "conv": conv, "add": add, "mul": mul,
    "div": div, "matmul": matmul, "attention": attention, "mask": mask,
}


def require(table: dict[str, OpRule], kind: Optional[str]) -> Optional[OpRule]:
    return table.get(kind) if kind else None


#: kind -> (reads its data inputs' values, reads its output value): what the forward must keep
NEEDS = {"linear": (True, True), "addmm": (True, True), "conv": (True, False), "add": (True, False),
         "mask": (True, False),
         "matmul": (True, True), "attention": (True, False), "pool": (True, True)}
