"""The model's own computation graph: `torch.export` once per model and input signature, then
a flat list of steps that the engine interprets (forward, attention gradients, relevance).

Nothing here calls the user's model after the export: the steps are ATen operations whose
parameters are read from the model at every run, so an explanation is of the model as it is at
the call. The export itself runs the model once on fake tensors, in inference mode; the model's
train/eval flags are restored afterwards, also when the export fails.
"""
from __future__ import annotations

import collections
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.export import Dim

from .errors import UnsupportedModelError

aten = torch.ops.aten


@dataclass(frozen=True)
class Ref:
    """A reference to the value of step ``index`` inside a step's arguments."""

    index: int


# -- op kinds: what a rule set maps to rules ---------------------------------------------------
# Elementwise functions of one tensor (and normalisations): relevance passes unchanged.
_IDENTITY = {
    aten.layer_norm.default: "norm", aten.native_layer_norm.default: "norm", aten.rms_norm.default: "norm",
    aten.group_norm.default: "norm",
    aten.gelu.default: "activation", aten.tanh.default: "activation", aten.relu.default: "activation",
    aten.silu.default: "activation", aten.sigmoid.default: "activation", aten.hardtanh.default: "activation",
    aten.elu.default: "activation", aten.leaky_relu.default: "activation", aten.mish.default: "activation",
    aten.softmax.int: "softmax", aten._softmax.default: "softmax",
    aten.dropout.default: "dropout", aten.feature_dropout.default: "dropout", aten.alpha_dropout.default: "dropout",
    aten.clone.default: "copy", aten.contiguous.default: "copy", aten.alias.default: "copy",
    aten.to.dtype: "copy", aten.to.dtype_layout: "copy", aten.to.device: "copy", aten._to_copy.default: "copy",
    aten.type_as.default: "copy", aten.lift_fresh_copy.default: "copy", aten.detach.default: "copy",
    aten.neg.default: "copy",
}
# Pure routing (each output element is one input element, or a sum of them): relevance is
# routed back by the operation's vector-Jacobian product.
_ROUTE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.transpose.int, aten.permute.default, aten.t.default, aten.expand.default, aten.slice.Tensor,
    aten.cat.default, aten.stack.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
    aten.chunk.default, aten.tensor_split.sections, aten.roll.default, aten.constant_pad_nd.default,
    aten.pad.default, aten.narrow.default, aten.repeat.default, aten.repeat_interleave.self_int,
    aten.movedim.int, aten.swapaxes.default, aten.flip.default, aten.expand_as.default, aten.view_as.default,
    aten.reshape_as.default, aten.unfold.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
    operator.getitem,
    # masked_fill on data (DeBERTa's attention mask): kept entries pass, filled ones get none
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
}
# Selections and averages (pooling): gradient x input, the authors' rule for their IndexSelect.
_POOL = {
    aten.select.int, aten.index.Tensor, aten.gather.default, aten.index_select.default,
    aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
    aten.avg_pool1d.default,
}
_KINDS: dict[Any, str] = {
    **_IDENTITY, **{op: "route" for op in _ROUTE}, **{op: "pool" for op in _POOL},
    aten.linear.default: "linear", aten.conv2d.default: "conv", aten.convolution.default: "conv",
    aten.add.Tensor: "add", aten.sub.Tensor: "add", aten.mul.Tensor: "mul", aten.div.Tensor: "div",
    aten.matmul.default: "matmul", aten.bmm.default: "matmul", aten.mm.default: "matmul",
    aten.einsum.default: "einsum", aten.baddbmm.default: "baddbmm", aten.addmm.default: "addmm",
    aten.scaled_dot_product_attention.default: "attention", aten.embedding.default: "embedding",
}
# Reductions and normalisers whose outputs are statistics of the data (a norm's mean, variance,
# 1/sqrt(var)): relevance never flows into them, as through a LayerNorm's statistics.
_STATISTICS = {
    aten.rsqrt.default, aten.reciprocal.default, aten.sqrt.default, aten.var.correction, aten.var.dim,
    aten.std.correction, aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim, aten.var_mean.correction,
    aten.amax.default, aten.max.dim, aten.logsumexp.default, aten.exp.default, aten.pow.Tensor_Scalar,
}
# Operations that only assert or describe: no value, no relevance.
_META = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


# Arguments read for their dtype only (``type_as(x, like)``): no data flows from them.
_DTYPE_ONLY = {aten.type_as.default: (1,)}


def op_kind(target: Any) -> Optional[str]:
    return _KINDS.get(target)


@dataclass
class Step:
    index: int
    name: str
    target: Any                      # the ATen op (or operator.getitem); None for placeholders
    args: tuple
    kwargs: dict
    module: str                      # the innermost module that ran it, for messages
    kind: Optional[str]
    data: bool = False               # a floating-point tensor that depends on the model's inputs
    statistic: bool = False          # a statistic of the data (see _STATISTICS)
    depends: bool = False            # depends on the model's inputs (any dtype)
    data_inputs: list[int] = field(default_factory=list)   # steps whose relevance this one returns
    consumers: list[int] = field(default_factory=list)     # data steps that take this one's value
    last_use: int = -1               # last step that reads this value in the forward pass

    def where(self) -> str:
        return f"{self.name} ({self.target}) in {self.module}"


@dataclass
class Program:
    """One exported graph, ready to run for inputs that match `signature`."""

    steps: list[Step]
    inputs: list[tuple[int, str, str]]       # (step, kind: "input"/"parameter"/"buffer"/"constant", name)
    outputs: list[Optional[int]]             # flat outputs: the step of each (None: a constant)
    constant_outputs: dict[int, Any]
    out_spec: Any                            # pytree spec to rebuild the model's output object
    attention_sites: list[int]               # steps computing attention probabilities, in order
    signature: dict[str, tuple]              # input name -> per-dim size, None = any
    constants: dict[str, Any]
    trace_seconds: float = 0.0
    input_kinds: dict = field(default_factory=dict)    # input name -> (dtype, device type) it was exported for

    def matches(self, shapes: dict[str, tuple]) -> bool:
        if set(shapes) != set(self.signature):
            return False
        for name, shape in shapes.items():
            want = self.signature[name]
            if len(want) != len(shape) or any(w is not None and w != s for w, s in zip(want, shape)):
                return False
        return True


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model"
    path, cls = list(stack.values())[-1]
    cls = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
    return f"{path or 'the model'} ({cls})"


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _walk(obj, fn):
    if isinstance(obj, Ref):
        fn(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _walk(item, fn)
    elif isinstance(obj, dict):
        for item in obj.values():
            _walk(item, fn)


def export_model(model: torch.nn.Module, inputs: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                 extra_kwargs: Optional[dict] = None) -> "torch.export.ExportedProgram":
    """`torch.export` the model in inference mode; its train/eval flags are restored after."""
    # the export runs the model's forward, which may set attributes (Swin sets its blocks'
    # shift and window sizes on first use): every module's attributes are put back afterwards
    saved = [(m, dict(vars(m))) for m in model.modules()]
    if any(t.is_inference() for t in model.state_dict(keep_vars=True).values()):
        # export cannot trace weights made under torch.inference_mode: it traces a copy (the
        # graph is all it keeps; the weights are read from the model itself at every run)
        import copy
        model = copy.deepcopy(model)
    per_input = {name: {d: Dim.AUTO for d in dims} for name, dims in dynamic.items()}
    dynamic_shapes = {name: per_input.get(name) for name in inputs}
    try:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (), {**inputs, **(extra_kwargs or {})}, strict=False,
                                       dynamic_shapes={**dynamic_shapes, **{k: None for k in (extra_kwargs or {})}})
    except Exception as error:  # any failure of tracing: the user needs to know which model and why
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(
            f"relprop could not trace {type(model).__name__} with torch.export ({type(error).__name__}: "
            f"{first[:300]}); relprop explains a model through its exported graph. Check that the model runs "
            f"on these inputs; see relprop.families() for the families known to trace") from error
    finally:
        for module, attributes in saved:
            state = vars(module)
            for name in [k for k in state if k not in attributes]:
                del state[name]
            for name, value in attributes.items():
                if state.get(name, attributes) is not value:
                    state[name] = value


def build_program(exported, input_names: list[str]) -> Program:
    """Translate an exported program into steps with data-flow facts the engine needs."""
    from torch.export.graph_signature import InputKind

    graph = exported.graph
    signature = exported.graph_signature
    kind_of_input: dict[str, tuple[str, str]] = {}
    for spec in signature.input_specs:
        name = str(getattr(spec.arg, "name", ""))
        if spec.kind == InputKind.USER_INPUT:
            kind_of_input[name] = ("input", name)
        elif spec.kind == InputKind.PARAMETER:
            kind_of_input[name] = ("parameter", spec.target)
        elif spec.kind == InputKind.BUFFER:
            kind_of_input[name] = ("buffer", spec.target)
        else:
            kind_of_input[name] = ("constant", spec.target)
    index_of: dict[torch.fx.Node, int] = {}
    steps: list[Step] = []
    shape_of: dict[int, Optional[tuple]] = {}
    inputs: list[tuple[int, str, str]] = []
    shapes: dict[str, tuple] = {}
    constants = dict(exported.constants)

    def to_ref(arg):
        if isinstance(arg, torch.fx.Node):
            return Ref(index_of[arg])
        if isinstance(arg, (list, tuple)):
            return type(arg)(to_ref(a) for a in arg)
        if isinstance(arg, dict):
            return {k: to_ref(v) for k, v in arg.items()}
        return arg

    output_node = None
    for node in graph.nodes:
        if node.op == "output":
            output_node = node
            continue
        index = len(steps)
        index_of[node] = index
        val = node.meta.get("val")
        shape_of[index] = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        if node.op == "placeholder":
            what, name = kind_of_input[node.name]
            if what == "input" and not isinstance(val, torch.Tensor):
                # a fixed forward argument (use_cache=False): exported as a constant input
                what = "constant"
                constants[name] = val
            step = Step(index, node.name, None, (), {}, name, "input" if what == "input" else None)
            if what == "input":
                step.depends = True
                step.data = _is_float_tensor(val)
                if isinstance(val, torch.Tensor):
                    shapes[name] = tuple(int(s) if isinstance(s, int) else None for s in val.shape)
            inputs.append((index, what, name))
            steps.append(step)
            continue
        if node.op != "call_function":
            raise UnsupportedModelError(f"the exported graph holds a {node.op} node {node.name} ({node.target}) "
                                        f"in {_module_of(node)}; relprop interprets plain ATen graphs only")
        step = Step(index, node.name, node.target, to_ref(node.args), to_ref(node.kwargs), _module_of(node),
                    op_kind(node.target))
        if node.target in _META:
            step.kind = "meta"
        refs: list[int] = []
        _walk((step.args, step.kwargs), lambda r: refs.append(r.index))
        for r in refs:
            steps[r].last_use = index
        depends = any(steps[r].depends for r in refs)
        step.depends = depends
        if node.target is operator.getitem:
            floating = _is_float_tensor(val)
        else:
            floating = _is_float_tensor(val) or (isinstance(val, (list, tuple)) and bool(val)
                                                 and all(_is_float_tensor(v) for v in val))
        # data: floating values computed from the inputs' values (pixels, or token embeddings);
        # masks and positions built from the inputs' shapes or from attention_mask are not
        step.data = bool(floating and (any(steps[r].data for r in refs) or (depends and step.kind == "embedding")))
        step.statistic = node.target in _STATISTICS or (
            step.data and any(steps[r].statistic for r in refs)
            and not any(steps[r].data and not steps[r].statistic for r in refs))
        if step.data and _functional(node.target) is not None:
            _make_functional(step, node, steps, index_of)
        if step.data:
            seen = {arg.index for position, arg in enumerate(step.args)
                    if position in _DTYPE_ONLY.get(node.target, ()) and isinstance(arg, Ref)}
            for r in refs:
                if steps[r].data and not steps[r].statistic and r not in seen:
                    seen.add(r)
                    step.data_inputs.append(r)
                    steps[r].consumers.append(index)
        steps.append(step)
    if output_node is None:
        raise UnsupportedModelError("the exported graph has no output")
    outputs: list[Optional[int]] = []
    constant_outputs: dict[int, Any] = {}
    for i, arg in enumerate(output_node.args[0]):
        if isinstance(arg, torch.fx.Node):
            outputs.append(index_of[arg])
            steps[index_of[arg]].last_use = len(steps)
        else:
            outputs.append(None)
            constant_outputs[i] = arg
    _collapse_activations(steps, shape_of, {i for i in outputs if i is not None})
    _fold_repeated_heads(steps, shape_of)
    sites = [s.index for s in steps if s.data and _is_attention_probabilities(s, steps)]
    for site in sites:
        _mark_mask(steps, site)
    return Program(steps, inputs, outputs, constant_outputs, exported.call_spec.out_spec, sites,
                   {name: shapes.get(name, ()) for name in input_names}, constants)


# Element-wise operations that can make up an activation written out in Python (GPT-2's tanh
# GELU: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``, ``x * sigmoid(x)``).
_ELEMENTWISE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.rsub.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.pow.Tensor_Scalar,
    aten.tanh.default, aten.sigmoid.default, aten.erf.default, aten.exp.default, aten.gelu.default,
    aten.silu.default, aten.relu.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
}
_AFFINE = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.neg.default,
           aten.mul.Scalar, aten.div.Scalar}


def _collapse_activations(steps: list[Step], shape_of: dict, outputs: set[int]) -> None:
    """A region of element-wise operations that computes a non-linear function of ONE data
    tensor ``x`` (and constants) and hands one result ``y`` of x's shape to the rest of the
    graph is an activation: ``y`` becomes one step of kind "activation" with input ``x``
    (identity rule; AttnLRP's implicit identity). Its inner steps still compute ``y`` but take
    no relevance. Without this, ``x * (1 + tanh(..x..))`` would look like a product of two
    data factors."""
    source: dict[int, int] = {}              # region member -> the tensor it is a function of
    users: dict[int, set[int]] = collections.defaultdict(set)
    for step in steps:
        refs: list[int] = []
        _walk((step.args, step.kwargs), lambda r: refs.append(r.index))
        data_refs = {r for r in refs if steps[r].data}
        for r in refs:
            users[r].add(step.index)
        if step.target not in _ELEMENTWISE or not step.data or not data_refs:
            continue
        if step.target in (aten.add.Tensor, aten.sub.Tensor) and any(not steps[r].data for r in refs):
            continue      # adding a tensor (a mask, a bias) ends an activation: Gemma 2's soft-capped scores + mask
        origins = {source.get(r, r) for r in data_refs}
        if len(origins) == 1:
            source[step.index] = origins.pop()
    regions: dict[int, list[int]] = collections.defaultdict(list)
    for member, x in source.items():
        regions[x].append(member)
    for x, members in regions.items():
        inside = set(members)
        leaving = [m for m in members if m in outputs or users[m] - inside]
        if len(members) < 2 or len(leaving) != 1 or shape_of.get(leaving[0]) != shape_of.get(x):
            continue
        linear = all(steps[m].target in _AFFINE or (steps[m].target is aten.mul.Tensor and
                     sum(1 for a in steps[m].args if isinstance(a, Ref) and steps[a.index].data) < 2)
                     or (steps[m].target is aten.div.Tensor and not isinstance(steps[m].args[1], Ref))
                     for m in members)
        if linear:                       # scalings and shifts: the ordinary rules are exact
            continue
        y = steps[leaving[0]]
        y.kind, y.statistic, y.data_inputs = "activation", False, [x]
        for m in members:
            if m != y.index:
                steps[m].data_inputs, steps[m].consumers = [], []
        steps[x].consumers = [c for c in steps[x].consumers if c not in inside] + [y.index]
        steps[x].last_use = max(steps[x].last_use, y.index)


_FULL_SLICE_END = 2 ** 63 - 1


def _repeat_chain(steps: list[Step], index: int) -> Optional[tuple[int, int, list[int]]]:
    """``(source, groups, chain)`` when step ``index`` is ``transformers``' ``repeat_kv`` of a
    [B, H_kv, S, D] tensor: ``x[:, :, None].expand(B, H_kv, groups, S, D).reshape(B, H_kv * groups,
    S, D)`` (full slices may sit between), else None."""
    def full_slice(step: Step) -> bool:
        start = step.args[2] if len(step.args) > 2 else 0
        end = step.args[3] if len(step.args) > 3 else None
        step_size = step.args[4] if len(step.args) > 4 else 1
        return start in (0, None) and end in (None, _FULL_SLICE_END) and step_size == 1

    def producer(i: int, *targets) -> Optional[int]:
        while steps[i].target is aten.slice.Tensor and full_slice(steps[i]) and isinstance(steps[i].args[0], Ref):
            chain.append(i)
            i = steps[i].args[0].index
        if steps[i].target not in targets or not steps[i].args or not isinstance(steps[i].args[0], Ref):
            return None
        chain.append(i)
        return steps[i].args[0].index

    chain: list[int] = []
    expand = producer(index, aten.reshape.default, aten.view.default, aten._unsafe_view.default)
    if expand is None:
        return None
    unsqueeze = producer(expand, aten.expand.default)
    if unsqueeze is None:
        return None
    sizes = steps[chain[-1]].args[1]
    source = producer(unsqueeze, aten.unsqueeze.default)
    if source is None or steps[chain[-1]].args[1] != 2:
        return None
    while steps[source].target is aten.slice.Tensor and full_slice(steps[source]) and isinstance(steps[source].args[0], Ref):
        chain.append(source)
        source = steps[source].args[0].index
    groups = sizes[2] if isinstance(sizes, (list, tuple)) and len(sizes) == 5 else None
    return (source, groups, chain) if isinstance(groups, int) else None


def _fold_repeated_heads(steps: list[Step], shape_of: dict) -> None:
    """Grouped-query attention as the graph has it (``repeat_kv`` copies each key/value head to its
    query heads before SDPA) becomes one SDPA call with ``enable_gqa=True`` on the key-value heads:
    the same attention, without the repeated [B, H, S, D] copies that autograd would keep for the
    backward pass and the rules would read. The repeat's steps no longer run (kind "meta"); the
    attention rules sum k's and v's relevance over each group, as the repeat's own rule would."""
    users: dict[int, set[int]] = collections.defaultdict(set)
    for step in steps:
        _walk((step.args, step.kwargs), lambda r, i=step.index: users[r.index].add(i))
    for step in steps:
        if step.kind != "attention" or len(step.args) < 3 or step.kwargs.get("enable_gqa"):
            continue
        q = step.args[0]
        maybe = [_repeat_chain(steps, a.index) if isinstance(a, Ref) else None for a in step.args[1:3]]
        found = [f for f in maybe if f is not None]
        if not isinstance(q, Ref) or len(found) != 2:
            continue
        heads = (shape_of.get(q.index) or (None, None))[1]
        sources = [shape_of.get(f[0]) for f in found]
        if not all(s is not None and len(s) == 4 and isinstance(s[1], int) and isinstance(heads, int)
                   and s[1] * f[1] == heads for s, f in zip(sources, found)):
            continue
        chains = {i for f in found for i in f[2]}
        ends = {a.index for a in step.args[1:3]}
        if any(users[i] - chains - {step.index} or (i in ends and users[i] != {step.index}) for i in chains):
            continue                        # a repeated value read elsewhere: leave the graph as it is
        args = list(step.args)
        for position, (source, _, _) in zip((1, 2), found):
            end = args[position].index
            args[position] = Ref(source)
            step.data_inputs = [source if i == end else i for i in step.data_inputs]
            steps[source].consumers = [c for c in steps[source].consumers if c not in chains] + [step.index]
            steps[source].last_use = max(steps[source].last_use, step.index)
        step.data_inputs = list(dict.fromkeys(step.data_inputs))
        step.args, step.kwargs = tuple(args), {**step.kwargs, "enable_gqa": True}
        for i in chains:
            dead = steps[i]
            dead.kind, dead.data, dead.data_inputs, dead.consumers = "meta", False, [], []


def _functional(target: Any) -> Any:
    """The out-of-place overload of an in-place ATen op (``add_.Tensor`` -> ``add.Tensor``), else None."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.name.endswith("_") or not schema.arguments:
        return None
    alias = schema.arguments[0].alias_info
    if alias is None or not alias.is_write:
        return None
    packet = getattr(aten, schema.name.split("::")[-1][:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _make_functional(step: Step, node, steps: list[Step], index_of: dict) -> None:
    """An in-place op on data (DeBERTa's ``score += p2c``) runs out of place, so the rules see
    its inputs' values as they were; allowed only where nothing else sees the mutation (the
    mutated value is a fresh result, not a view, and nothing reads it later)."""
    mutated = node.args[0]
    others = [user for user in mutated.users if user is not node]
    # a later reader, or a view taken before (it would show the change), sees the mutation
    seen = [u for u in others if u not in index_of or steps[index_of[u]].kind in ("route", "copy")]
    source = steps[index_of[mutated]]
    if seen or source.target is None or source.kind in ("route", "copy"):
        raise UnsupportedModelError(
            f"relprop cannot follow the in-place {node.target} in {_module_of(node)}: it changes a value that "
            f"{'is read elsewhere' if seen else 'is a view of another value or an input'}; relprop propagates "
            f"relevance through in-place operations only on a fresh result nothing else reads")
    step.target = _functional(node.target)
    step.kind = op_kind(step.target)


def _is_attention_probabilities(step: Step, steps: list[Step]) -> bool:
    """SDPA, or a softmax whose probabilities multiply a value tensor (eager attention)."""
    if step.kind == "attention":
        return True
    if step.kind != "softmax":
        return False
    frontier, seen = list(step.consumers), set()
    while frontier:                       # through dropout / casts to the product with V
        i = frontier.pop()
        if i in seen:
            continue
        seen.add(i)
        kind = steps[i].kind
        if kind in ("matmul", "einsum"):
            return True
        if kind in ("dropout", "copy", "route"):
            frontier.extend(steps[i].consumers)
    return False


def _mark_mask(steps: list[Step], site: int) -> None:
    """The addition of a mask or bias to the attention scores, in a graph with an explicit
    softmax, becomes kind "mask": the rule preset decides how relevance crosses it."""
    index = site
    while steps[index].data_inputs:
        step = steps[index]
        if step.kind == "add" and len(step.data_inputs) == 1 and index != site:
            step.kind = "mask"
            return
        if step.kind not in ("softmax", "copy", "mul", "div", "dropout") or len(step.data_inputs) != 1:
            return
        index = step.data_inputs[0]


@dataclass
class Tracer:
    """Exports a model per input signature and keeps the programs (one model, one explainer)."""

    dynamic: dict[str, tuple[int, ...]]                 # input name -> dims that may vary
    extra_kwargs: dict = field(default_factory=dict)    # e.g. use_cache=False for decoders
    programs: list[Program] = field(default_factory=list)
    on_trace: Optional[Callable[[Program], None]] = None

    def program(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Program:
        shapes = {name: tuple(t.shape) for name, t in inputs.items()}
        for program in self.programs:
            if program.matches(shapes) and self._same_kinds(program, inputs):
                return program
        import time

        start = time.perf_counter()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        example = {name: _example(t.to(dtype) if t.is_floating_point() and dtype is not None else t,
                                  self.dynamic.get(name, ())) for name, t in inputs.items()}
        exported = export_model(model, example, self.dynamic, self.extra_kwargs)
        program = build_program(exported, list(inputs))
        program.trace_seconds = time.perf_counter() - start
        program.input_kinds = {name: (t.dtype, t.device.type) for name, t in inputs.items()}
        self.programs.append(program)
        if self.on_trace is not None:
            self.on_trace(program)
        return program

    @staticmethod
    def _same_kinds(program: Program, inputs) -> bool:
        return program.input_kinds == {n: (t.dtype, t.device.type) for n, t in inputs.items()}


def _example(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The example the export traces with: dynamic dims of size 0 or 1 would be specialised by
    the tracer, so they are grown to 2 (repeating the data; only shapes and dtypes matter)."""
    for d in dims:
        if d < t.dim() and t.shape[d] < 2:
            t = torch.cat([t, t], dim=d) if t.shape[d] == 1 else t
    return t


#: structure -> Tracer: explainers share exports, also across model objects of one structure (a
#: test suite or an evaluation builds many); the least recently used are dropped beyond a bound
_TRACERS: "collections.OrderedDict[tuple, Tracer]" = collections.OrderedDict()
_MAX_TRACERS = 32
_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _settings(value, configs: dict):
    """A hashable description of a module attribute that is not a tensor or a submodule."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list, set, frozenset)):
        items = [_settings(v, configs) for v in value]
        return tuple(sorted(items, key=repr)) if isinstance(value, (set, frozenset)) else tuple(items)
    if isinstance(value, dict):
        return tuple(sorted(((repr(k), _settings(v, configs)) for k, v in value.items())))
    to_json = getattr(value, "to_json_string", None)
    if callable(to_json):                          # a transformers config: by content
        if id(value) not in configs:
            configs[id(value)] = to_json(use_diff=False)
        return configs[id(value)]
    return ("object", id(value))                   # anything else: by identity (never shared wrongly)


def structure_key(model: torch.nn.Module) -> tuple:
    """Everything an export depends on besides tensor values: each module's class and settings
    (every attribute that is not a tensor or a submodule: eps, flags, configs, a patched
    ``forward``), its hooks, and the names, shapes and dtypes of the weights."""
    configs: dict = {}
    modules = []
    for name, module in model.named_modules():
        settings = tuple(sorted((k, _settings(v, configs)) for k, v in vars(module).items()
                                if not k.startswith("_") or k in ("_attn_implementation",)))
        hooks = tuple(len(getattr(module, h)) for h in ("_forward_hooks", "_forward_pre_hooks"))
        modules.append((name, type(module), settings, hooks))
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device.type)
                    for name, t in model.state_dict(keep_vars=True).items())
    return tuple(modules), tensors


def tracer_for(model: torch.nn.Module, dynamic: dict, extra_kwargs: dict, fresh: bool = False) -> Tracer:
    """The tracer for the model's current structure (a new one if ``fresh``: export again)."""
    key = (structure_key(model), tuple(sorted(extra_kwargs.items())))
    if fresh or key not in _TRACERS:
        _TRACERS[key] = Tracer(dynamic, extra_kwargs)
    _TRACERS.move_to_end(key)
    while len(_TRACERS) > _MAX_TRACERS:
        _TRACERS.popitem(last=False)
    return _TRACERS[key]
