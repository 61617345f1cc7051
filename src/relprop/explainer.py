"""`Explainer`: the one public verb, ``explain``, on the user's model as it is."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from . import engine
from .adapters import adapt
from .errors import InputError
from .methods import Trace, get_method
from .methods.base import resolve_options
from .result import Explanation, Internals
from .rules import get_rule_set

TargetLike = Union[None, int, Sequence[int], torch.Tensor]


class Explainer:
    """Explains a Transformer classifier's decisions without touching the model.

    ``model``: a supported Hugging Face or timm classifier, used as is (its weights are read,
    never changed; no hooks; its train/eval mode and attention implementation are left alone;
    explanations always use inference behaviour, i.e. no dropout).
    ``dtype``: compute on a copy of the weights in this dtype (e.g. ``torch.float64`` for
    reference-grade numbers). By default the model's own weights are used directly
    (half-precision models are computed in float32).
    """

    def __init__(self, model: torch.nn.Module, dtype: Optional[torch.dtype] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Explainer expects a torch.nn.Module, got {type(model).__name__}")
        if dtype is None:
            dtype = next(model.parameters()).dtype
            if dtype not in (torch.float32, torch.float64):
                dtype = torch.float32
        self.model = model
        self.dtype = dtype
        self.adapter = adapt(model, dtype)
        self.architecture = self.adapter.architecture

    @property
    def modality(self) -> str:
        return self.architecture.modality

    @property
    def labels(self) -> dict[int, str]:
        return self.architecture.labels

    def explain(self, inputs: Any, method: str = "transformer_attribution", target: TargetLike = None,
                *, keep_internals: bool = False, **options) -> Explanation:
        """Explain a batch.

        ``inputs``: pixel values [B, C, H, W] (normalised as the model expects) for vision
        models; the tokenizer's output (``input_ids``, ``attention_mask``, optional
        ``token_type_ids``) for text models.
        ``target``: None (each sample's predicted class), an int (the same class for all),
        or B ints. ``keep_internals``: also return every block's A, ∇A and R_A (whichever
        the method computed) in ``result.internals``.
        """
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
            target_index = _resolve_target(target, logits)
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
                           mask=prepared.extras.get("attention_mask"), internals=internals)

    def logits(self, inputs: Any) -> torch.Tensor:
        """The model's logits as relprop computes them (equal to the model's own)."""
        with torch.no_grad():
            prepared = self.adapter.prepare(inputs)
            return engine.forward(self.architecture, prepared.hidden, prepared.valid).logits


def _check_finite(logits: torch.Tensor) -> None:
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"the model's logits are not finite for sample(s) {bad}; check the input's scale "
                         "and normalisation (use the model's image processor / tokenizer)")


def _resolve_target(target: TargetLike, logits: torch.Tensor) -> torch.Tensor:
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, bool):
        raise InputError("target must be None, an int or a sequence of ints, not a bool")
    if isinstance(target, int):
        index = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        index = torch.as_tensor(target, device=logits.device)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise InputError(f"target must hold integer class indices, got dtype {index.dtype}")
        index = index.long().reshape(-1)
        if index.numel() == 1 and batch > 1:
            index = index.expand(batch)
        if index.numel() != batch:
            raise InputError(f"target has {index.numel()} entries for a batch of {batch}")
    if (index < 0).any() or (index >= classes).any():
        raise InputError(f"target class out of range: the model has {classes} classes (0..{classes - 1}), "
                         f"got {index.tolist()}")
    return index.clone()
