"""`Explainer`: the one public verb, ``explain``, on the user's model as it is at each call."""
from __future__ import annotations

import numbers
import weakref
from typing import Any, Optional, Sequence, Union

import torch

from . import engine
from .adapters import adapt
from .adapters.base import labels_of
from .errors import InputError, OptionError, UnsupportedModelError, did_you_mean
from .attributions import Trace, get_method
from .attributions.base import resolve_options
from .result import Explanation, Internals
from .rules import get_rule_set

TargetLike = Union[None, int, str, Sequence[Union[int, str]], torch.Tensor]

#: dtypes an explanation can be computed in; half precision is refused because relevance
#: propagation divides by sums that nearly cancel (float16/bfloat16 maps are off by 100 % and more)
COMPUTE_DTYPES = (torch.float32, torch.float64)


class Explainer:
    """Explains a Transformer classifier's decisions without touching the model.

    Parameters
    ----------
    model : torch.nn.Module
        A supported Hugging Face or timm classifier, used as is: its weights are read, never
        changed; no hooks; its train/eval mode and attention implementation are left alone
        and do not matter (explanations always use inference behaviour, i.e. no dropout). A
        subclass of a supported class is explained as that class computes (an overridden
        ``forward`` is not looked at). All its weights must be real (not on the ``meta``
        device), floating point and on one device.
    dtype : torch.dtype, optional
        ``torch.float32`` or ``torch.float64`` (``torch.float64`` for reference-grade numbers;
        see the README on float32's accuracy for the LRP-based methods). Where it differs from
        the model's dtype, the explainer computes on a copy of the weights in this dtype. By
        default it computes in the model's dtype on the model's own weights (no copy); a model
        in half precision, or with weights of mixed dtypes, is computed in float32.

    Notes
    -----
    Every `explain` / `logits` call explains the model as it is at that call. A cheap
    fingerprint of the model's modules, parameters and buffers (identity, storage address,
    shape, strides, dtype, device and PyTorch's version counter, which every in-place
    operation bumps: ``with torch.no_grad(): p.add_(...)``, ``load_state_dict``, optimiser
    steps, in-place updates under ``torch.inference_mode``) is checked at each call, and
    the weights are re-read when it changed (``p.data = new``, replaced parameters or
    modules, ``model.to(...)`` included).

    One kind of change is invisible to that check: an in-place operation on ``p.data``
    (``p.data.copy_(...)``, ``p.data.add_(...)``), which bypasses the version counter. When
    the explainer computes on the model's own weights (the default for a float32 / float64
    model) it reads them directly and sees such changes anyway; when it computes on a copy
    (``dtype`` differs from the model's, or a half-precision model) call `refresh` after
    them. Parameters created under ``torch.inference_mode`` have no version counter (and
    autograd cannot use them): for such a model a copy is re-made at every call. Settings
    that are not tensors (a LayerNorm's ``eps``; the head count or activation named in the
    config) are read with the weights: after changing one in place, call `refresh`. The
    labels are read from the model at each use.
    """

    def __init__(self, model: torch.nn.Module, dtype: Optional[torch.dtype] = None):
        if not isinstance(model, torch.nn.Module):
            raise UnsupportedModelError(f"Explainer expects a torch.nn.Module (a loaded classifier), "
                                        f"got {type(model).__name__}")
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise OptionError(_dtype_message(dtype))
        self.model = model
        self._requested_dtype = dtype
        self._state_key: Optional[tuple] = None
        self._state_refs: list[weakref.ref] = []
        self.refresh()

    @property
    def modality(self) -> str:
        self._sync()
        return self.architecture.modality

    @property
    def labels(self) -> dict[int, str]:
        """Class index -> name, read from the model (``config.id2label``) at each access."""
        return labels_of(self.model)

    def refresh(self) -> None:
        """Re-read the model's weights now.

        Only needed after in-place changes through ``p.data`` while the explainer computes
        on a copy of the weights (see the class notes); every other change is detected.
        """
        objects, key = _weights_state(self.model)
        dtype = _compute_dtype(self.model, self._requested_dtype)
        with torch.inference_mode(False):       # copies made here must be usable by autograd
            self.adapter = adapt(self.model, dtype)
        self.dtype = dtype
        self.architecture = self.adapter.architecture
        self._state_key = key
        self._state_refs = [weakref.ref(o) for o in objects]

    def _sync(self) -> None:
        """Re-read the weights if the model changed since they were last read."""
        objects, key = _weights_state(self.model)
        # the weak references rule out a replaced object that happens to reuse an old id/address
        if (key is None or key != self._state_key or len(objects) != len(self._state_refs)
                or any(ref() is not obj for ref, obj in zip(self._state_refs, objects))):
            self.refresh()

    def class_index(self, target: Union[int, str]) -> int:
        """The class index of ``target``: an int is returned as is, a str is looked up in
        the model's labels (``config.id2label``; exact name, else a unique case-insensitive match).
        """
        if isinstance(target, bool) or not isinstance(target, (numbers.Integral, str)):
            raise InputError(f"a target class must be an int index or a label name (str), "
                             f"not {type(target).__name__} {target!r}")
        if not isinstance(target, str):
            return int(target)
        return label_index(target, self.labels)

    def explain(self, inputs: Any, method: str = "transformer_attribution", target: TargetLike = None,
                *, keep_internals: bool = False, **options) -> Explanation:
        """Explain a batch.

        Parameters
        ----------
        inputs
            Pixel values [B, C, H, W] (normalised as the model expects) for vision models;
            the tokenizer's output (``input_ids``, ``attention_mask``, optional
            ``token_type_ids``) for text models.
        method : str
            One of `relprop.methods()`.
        target
            None (each sample's predicted class), a class index or label name (the same
            class for all), or B of them (ints, names, or a mix; or a tensor of indices).
        keep_internals : bool
            Also return every block's A, ∇A and R_A (whichever the method computed) in
            ``result.internals``.
        **options
            The method's options.

        Returns
        -------
        Explanation
        """
        self._sync()
        chosen = get_method(method)
        options = resolve_options(chosen, options, self.adapter.method_defaults.get(method, {}))
        num_blocks = len(self.architecture.blocks)
        needs = chosen.requirements(num_blocks, **options)
        rules = None if needs.relevance_rules is None else get_rule_set(needs.relevance_rules)
        with torch.inference_mode(False), torch.enable_grad():
            prepared = self.adapter.prepare(inputs)
            grad_from = min(needs.gradient_blocks) if needs.gradient_blocks else None
            fwd = engine.forward(self.architecture, prepared.hidden, prepared.valid, grad_from=grad_from,
                                 all_rows=needs.all_rows or keep_internals,
                                 keep=rules is not None)
            logits = fwd.logits.detach()
            _check_finite(logits)
            target_index = self._resolve_target(target, logits)
            grads = {}
            if needs.gradient_blocks:
                grads = engine.attention_gradients(fwd, target_index, sorted(needs.gradient_blocks))
        with torch.no_grad():
            relevance = engine.Relevance()
            if rules is not None:
                relevance = engine.propagate(self.architecture, fwd, target_index, rules,
                                             lowest_block=needs.relevance_lowest, to_input=needs.input_relevance)
            trace = Trace(attention=[r.attention.detach() for r in fwd.records], attention_grad=grads,
                          attention_relevance=relevance.attention,
                          rows=[None if r.rows is None else r.rows.tolist() for r in fwd.records],
                          valid=prepared.valid, content=prepared.content, token=self.architecture.head[0].token)
            if needs.input_relevance:
                trace.input_relevance = self.adapter.input_relevance(prepared, relevance.encoder_input, rules)
            scores = chosen(trace, **options)
            if not chosen.input_level:
                scores = scores[:, prepared.content]
            scores = self.adapter.finalize(scores, prepared, chosen.input_level)
        internals = Internals(trace.attention, grads, relevance.attention) if keep_internals else None
        return Explanation(relevance=scores.detach(), target=target_index, logits=logits, method=method,
                           options=options, grid=getattr(self.adapter, "grid", None) if not chosen.input_level else None,
                           input_size=tuple(prepared.extras["pixels"].shape[-2:]) if "pixels" in prepared.extras else None,
                           mask=prepared.extras.get("attention_mask"), internals=internals,
                           modality=self.architecture.modality)

    def logits(self, inputs: Any) -> torch.Tensor:
        """The model's logits as relprop computes them (equal to the model's own)."""
        self._sync()
        with torch.no_grad():
            prepared = self.adapter.prepare(inputs)
            return engine.forward(self.architecture, prepared.hidden, prepared.valid).logits

    def _resolve_target(self, target: TargetLike, logits: torch.Tensor) -> torch.Tensor:
        batch, classes = logits.shape
        if target is None:
            return logits.argmax(dim=1)
        if isinstance(target, (str, numbers.Integral)):
            index = torch.full((batch,), self.class_index(target), dtype=torch.long, device=logits.device)
        else:
            if not isinstance(target, torch.Tensor) and _has_names(target):
                target = [self.class_index(t) for t in target]
            index = torch.as_tensor(target, device=logits.device)
            if index.is_floating_point() or index.dtype == torch.bool:
                raise InputError(f"target must hold integer class indices or label names, got dtype {index.dtype}")
            index = index.long().reshape(-1)
            if index.numel() == 1 and batch > 1:
                index = index.expand(batch)
            if index.numel() != batch:
                raise InputError(f"target has {index.numel()} entries for a batch of {batch}")
        if (index < 0).any() or (index >= classes).any():
            raise InputError(f"target class out of range: the model has {classes} classes (0..{classes - 1}), "
                             f"got {index.tolist()}")
        return index.clone()


def label_index(name: str, labels: dict[int, str]) -> int:
    """Index of the class called ``name`` in ``labels`` (exact, else unique case-insensitive match)."""
    exact = [i for i, label in labels.items() if label == name]
    if not exact:
        exact = [i for i, label in labels.items() if label.casefold() == name.casefold()]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise InputError(f"label {name!r} names several classes {sorted(exact)}; pass the class index instead")
    if not labels:
        raise InputError(f"unknown label {name!r}: this model has no label names (config.id2label); "
                         "pass a class index (an int) instead")
    shown = ", ".join(f"{i}: {labels[i]!r}" for i in sorted(labels)[:10])
    more = f", ... ({len(labels)} classes)" if len(labels) > 10 else ""
    raise InputError(f"unknown label {name!r}.{did_you_mean(name, labels.values())} "
                     f"The model's labels: {shown}{more}; or pass a class index (an int)")


def _has_names(target: Any) -> bool:
    try:
        return any(isinstance(t, str) for t in target)
    except TypeError:       # not iterable: torch.as_tensor reports it
        return False


def _dtype_message(dtype: Any) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        why = ("half precision is too coarse for relevance propagation (its divisions by sums that nearly "
               "cancel put LRP-based maps off by 100 % and more)")
    else:
        why = "relprop computes in floating point"
    return f"dtype={dtype!r} is not supported: {why}; use dtype=torch.float32 or torch.float64"


def _compute_dtype(model: torch.nn.Module, requested: Optional[torch.dtype]) -> torch.dtype:
    """Check that the model's weights can be read, and pick the dtype to compute in."""
    params = list(model.parameters())
    if not params:
        raise UnsupportedModelError(f"{type(model).__name__} has no parameters: pass a loaded classifier")
    devices = sorted({str(p.device) for p in params})
    if any(p.is_meta for p in params):
        raise UnsupportedModelError("the model's weights are on the 'meta' device (they hold no values): load real "
                                    "weights first, e.g. from_pretrained(...) without device_map='meta' or "
                                    "init_empty_weights(), or model.to_empty(...) followed by load_state_dict(...)")
    if len(devices) > 1:
        raise UnsupportedModelError(f"the model's weights are spread over several devices ({', '.join(devices)}); "
                                    "relprop computes on one: move the model there first, e.g. model.to('cuda:0') "
                                    "(device_map='auto' splits a model)")
    dtypes = {p.dtype for p in params}
    odd = sorted(str(d) for d in dtypes if not d.is_floating_point)
    if odd:
        raise UnsupportedModelError(f"the model has weights of dtype {', '.join(odd)} (a quantized model?); relprop "
                                    "needs floating-point weights: load the model in float32")
    if requested is not None:
        return requested
    return torch.float64 if dtypes == {torch.float64} else torch.float32


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:        # an inference tensor keeps no version counter
        return None


def _weights_state(model: torch.nn.Module) -> tuple[list, Optional[tuple]]:
    """The model's modules and tensors, and a key that changes whenever a tensor's data may
    have (None: undecidable, for tensors made under torch.inference_mode)."""
    modules = list(model.modules())
    tensors = [t for m in modules for group in (m._parameters, m._buffers) for t in group.values() if t is not None]
    key = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, _version(t)) for t in tensors)
    if any(entry[-1] is None for entry in key):
        key = None
    return modules + tensors, key


def _check_finite(logits: torch.Tensor) -> None:
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"the model's logits are not finite for sample(s) {bad}; check the input's scale "
                         "and normalisation (use the model's image processor / tokenizer)")
