"""`Explainer`: the one public verb, ``explain``, on the user's model as it is at each call."""
from __future__ import annotations

import numbers
import weakref
from typing import Any, Callable, Optional, Sequence, Union, cast

import torch

from . import engine, tokens
from .errors import InputError, OptionError, UnsupportedModelError, did_you_mean
from .registry import Family, family_of, labels_of
from .graph import Program, tracer_for
from .inputs import DYNAMIC, Prepared, prepare
from .attributions import Method, Requirements, Trace, get_method
from .attributions.base import resolve_options
from .result import Explanation, Internals
from .rules import PRESETS, get_rule_set

TargetLike = Union[None, int, str, Sequence[Union[int, str]], torch.Tensor, Callable[[Any], torch.Tensor]]

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
        subclass of a supported class is accepted (its own ``forward`` is what gets exported
        and explained). All its weights must be real (not on the ``meta``
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
    that are not tensors (a LayerNorm's ``eps``, a module's flags, its ``config``, hooks, a
    patched ``forward``) are part of the model's structure, checked at every call: a changed
    one is exported again. State the forward reads from elsewhere (a global, a closure) is
    not seen: call `refresh` after changing it. The labels are read from the model at each use.
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
        self._reread(retrace=False)

    @property
    def modality(self) -> str:
        """``"image"`` or ``"text"``: the model family's inputs."""
        return self.family.modality

    @property
    def labels(self) -> dict[int, str]:
        """Class index -> name, read from the model (``config.id2label``) at each access."""
        return labels_of(self.model)

    def refresh(self) -> None:
        """Re-read the model now: its weights and its graph (exported again at the next call).

        Only needed after in-place changes through ``p.data`` while the explainer computes
        on a copy of the weights, or after changing state the model's forward reads from
        outside its modules; see the class notes. Every other change is detected.
        """
        self._reread(retrace=True)

    def _reread(self, retrace: bool) -> None:
        objects, key = _weights_state(self.model)
        dtype = _compute_dtype(self.model, self._requested_dtype)
        if not hasattr(self, "family"):
            self.family: Family = family_of(self.model)
        self.tracer = tracer_for(self.model, DYNAMIC, self.family.forward_kwargs, fresh=retrace)
        with torch.inference_mode(False):       # copies made here must be usable by autograd
            self.weights = _read_weights(self.model, dtype)
        self.dtype = dtype
        self.device = next(self.model.parameters()).device
        self._state_key = key
        self._state_refs = [weakref.ref(o) for o in objects]

    def _sync(self) -> None:
        """Re-read the weights if the model changed since they were last read."""
        objects, key = _weights_state(self.model)
        # the weak references rule out a replaced object that happens to reuse an old id/address
        if (key is None or key != self._state_key or len(objects) != len(self._state_refs)
                or any(ref() is not obj for ref, obj in zip(self._state_refs, objects))):
            self._reread(retrace=False)

    def class_index(self, target: Union[int, str]) -> int:
        """The class index of ``target``.

        Parameters
        ----------
        target : int or str
            An int is returned as is; a str is looked up in the model's labels
            (``config.id2label``; exact name, else a unique case-insensitive match).

        Returns
        -------
        int
        """
        if isinstance(target, bool) or not isinstance(target, (numbers.Integral, str)):
            raise InputError(f"a target class must be an int index or a label name (str), "
                             f"not {type(target).__name__} {target!r}")
        if not isinstance(target, str):
            return int(target)
        return label_index(target, self.labels)

    def program(self, inputs: Any) -> tuple[Program, Prepared]:
        """The model's exported graph for ``inputs`` (exported on first use per input signature).

        Parameters
        ----------
        inputs
            As for `explain`.

        Returns
        -------
        tuple of (graph.Program, inputs.Prepared)
            The program (its ``steps`` carry each operation's kind and module) and the
            checked inputs.
        """
        self._sync()
        # the structure (module settings such as a norm's eps, patched forwards, hooks) is
        # checked at every call: a changed one gets its own export
        self.tracer = tracer_for(self.model, DYNAMIC, self.family.forward_kwargs)
        with torch.inference_mode(False):
            prepared = prepare(self.model, self.family, inputs, self.dtype, self.device)
            return self.tracer.program(self.model, prepared.kwargs), prepared

    def _sites(self, program: Program) -> list[int]:
        """The explained attention layers (the family's scope), as positions among the graph's."""
        scope = self.family.scope
        sites = [i for i, step in enumerate(program.attention_sites)
                 if not scope or program.steps[step].module.startswith(scope)]
        if not sites:
            raise UnsupportedModelError(f"no attention found in the exported graph of {type(self.model).__name__}")
        return sites

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
            class for all), B of them (ints, names, or a mix; or a tensor of indices), or a
            callable ``f(model_output) -> [B]`` giving the score to explain per sample (one
            label of a multi-label model, a regression output, a similarity to a reference
            embedding; ``model_output`` is what the model returns). LRP starts from the
            gradient of that score at the model's outputs: for a class index, a one-hot of 1.
        keep_internals : bool
            Also return every block's A, ∇A and R_A (whichever the method computed) in
            ``result.internals``.
        **options
            The method's options.

        Returns
        -------
        Explanation
        """
        chosen = get_method(method)
        options = resolve_options(chosen, options, self.family.defaults().get(method, {}))
        program, prepared = self.program(inputs)
        sites = self._sites(program)
        needs = chosen.requirements(len(sites), **options)
        if needs.gradient_rules is not None:
            scores, output, target_index = self._by_gradient(chosen, options, needs, program, prepared, target)
            internals = None
        else:
            (scores,), output, target_index, internals = self._by_trace([(chosen, options)], needs, program, prepared,
                                                                        target, sites, keep_internals)
        return self._explanation(method, chosen, options, scores, output, target_index, prepared, internals)

    def explain_many(self, inputs: Any, methods: Sequence[str], target: TargetLike = None,
                     options: Optional[dict[str, dict]] = None) -> dict[str, Explanation]:
        """Several methods' explanations of one batch for the same target, sharing passes.

        The inputs are checked and the graph looked up once. The methods that read one pass
        (attention, its gradients, a relevance propagation with one rule set) are computed
        together: one forward, one gradient computation for all the blocks any of them needs,
        one propagation down to the lowest block any of them needs; each method then reads its
        own map from that pass. Methods that need no relevance join the first rule set's pass.
        AttnLRP and CP-LRP (one modified backward pass each) run on their own.

        Parameters
        ----------
        inputs, target
            As for `explain`.
        methods : sequence of str
            Some of `relprop.methods()` (a repeated one is explained once).
        options : dict of str to dict, optional
            Method -> its options.

        Returns
        -------
        dict of str to Explanation
            Method -> what ``explain(inputs, method, target, **options[method])`` returns
            (internals not kept), in the order given. The maps agree up to float rounding: a
            streaming method alone computes its attention on the fused path.
        """
        options = dict(options or {})
        stray = sorted(set(options) - set(methods))
        if stray:
            raise OptionError(f"options given for {stray[0]!r}, which is not among the methods {list(methods)}")
        named = [(method, get_method(method)) for method in dict.fromkeys(methods)]     # refused before any work
        resolved_options = [resolve_options(chosen, options.get(method, {}), self.family.defaults().get(method, {}))
                            for method, chosen in named]
        program, prepared = self.program(inputs)
        sites = self._sites(program)
        planned = [(method, chosen, resolved, chosen.requirements(len(sites), **resolved))
                   for (method, chosen), resolved in zip(named, resolved_options)]
        passes: dict[Optional[str], list] = {}
        for entry in planned:
            if entry[3].gradient_rules is None:
                passes.setdefault(entry[3].relevance_rules, []).append(entry)
        if None in passes and len(passes) > 1:          # no rules needed: ride along with the first rule set
            free = passes.pop(None)
            passes[next(iter(passes))] += free
        results: dict[str, Explanation] = {}
        for group in passes.values():
            needs = _merged([entry[3] for entry in group])
            scores, output, target_index, _ = self._by_trace([(chosen, resolved) for _, chosen, resolved, _ in group],
                                                             needs, program, prepared, target, sites, False)
            for (method, chosen, resolved, _), map_ in zip(group, scores):
                results[method] = self._explanation(method, chosen, resolved, map_, output, target_index, prepared, None)
        for method, chosen, resolved, needs in planned:
            if needs.gradient_rules is not None:
                map_, output, target_index = self._by_gradient(chosen, resolved, needs, program, prepared, target)
                results[method] = self._explanation(method, chosen, resolved, map_, output, target_index, prepared, None)
        return {method: results[method] for method, *_ in planned}

    def _explanation(self, method: str, chosen, options: dict, scores: torch.Tensor, output,
                     target_index, prepared: Prepared, internals: Optional[Internals]) -> Explanation:
        grid = prepared.extras.get("grid") if not chosen.input_level else None
        return Explanation(relevance=scores.detach(), target=target_index, logits=self._logits(output, prepared.valid),
                           method=method, options=options, grid=grid,
                           input_size=tuple(prepared.extras["pixels"].shape[-2:]) if "pixels" in prepared.extras else None,
                           mask=prepared.extras.get("attention_mask"), internals=internals,
                           modality=self.family.modality)

    def _by_trace(self, methods: list[tuple[Method, dict]], needs, program: Program, prepared: Prepared,
                  target: TargetLike, sites: list[int], keep_internals: bool):
        """The attention-based methods and LRP: one forward, attention gradients, relevance
        propagation, then each method (with its options) reads the per-block A, ∇A, R_A;
        ``needs`` covers all of them. Returns one map per method."""
        chosen, options = methods[0]
        num_blocks = len(sites)
        rules = None if needs.relevance_rules is None else get_rule_set(needs.relevance_rules)
        preset = PRESETS[self.family.preset]
        input_point = self._input_point(program) if needs.input_relevance else None
        # one method that reduces each block as the propagation reaches it keeps no block's ∇A, R_A
        streams = not keep_internals and len(methods) == 1 and type(chosen).reduce_block is not Method.reduce_block
        # a streaming method on SDPA attention: the forward keeps no block's A (recomputed by the
        # relevance rule when it reaches the block; ∇A = ∇O · Vᵀ from the SDPA output's gradient)
        fused = (streams and rules is not None and self.family.token_grids is None
                 and all(program.steps[program.attention_sites[s]].kind == "attention" for s in sites))
        with torch.inference_mode(False), torch.enable_grad():
            grad_site = sites[min(needs.gradient_blocks)] if needs.gradient_blocks else None
            keep = _kept_values(program, rules) if rules is not None else frozenset()
            with torch.set_grad_enabled(grad_site is not None):
                fwd = engine.forward(program, prepared.kwargs, self.weights, self.dtype, keep=keep,
                                     grad_site=grad_site, fused_attention=fused)
            output = _unflatten(program, fwd.outputs)
            score_of, target_index = self._score_function(target, output, prepared.batch, prepared.valid)
            grads = {}
            if needs.gradient_blocks:
                blocks = sorted(needs.gradient_blocks)
                scores = score_of(output)
                wrt = [fwd.attention_out[sites[b]] if fused else fwd.attention[sites[b]] for b in blocks]
                found = torch.autograd.grad(scores.sum(), wrt)
                grads = dict(zip(blocks, found))
                del scores
            fwd.release_graph()
            output = _unflatten(program, fwd.outputs)
        with torch.inference_mode(False), torch.no_grad():
            layout = self._layout(fwd, sites, prepared)
            relevance = engine.Relevance()
            reduced: dict[int, torch.Tensor] = {}
            block_of = {site: block for block, site in enumerate(sites)}

            def reduce_block(site: int, rel: torch.Tensor, heads: Optional[tuple[int, int, int]]) -> None:
                """Stream: reduce a block's ∇A and R_A as soon as R_A exists; keep neither. R_A of
                a slice of heads (fused forward only) adds its heads' share of the head mean."""
                block = block_of.get(site)
                if block is None or block not in grads:
                    return
                start, stop, total = heads or (0, rel.shape[-3], rel.shape[-3])
                grad = grads.pop(block) if stop == total else grads[block]
                if fused:
                    grad = _attention_grad(fwd, site, grad, start, stop)
                elif heads is not None:
                    raise RuntimeError("internal error: R_A by slices of heads without a fused forward")
                if layout is not None:
                    grad, rel = layout.globalize(block, grad, prepared.batch), layout.globalize(block, rel, prepared.batch)
                part = chosen.reduce_block(grad, rel, **options)
                assert part is not None          # streaming is chosen only for a method that reduces its blocks
                if heads is None:
                    reduced[block] = part
                else:
                    part = part * ((stop - start) / total)
                    reduced[block] = part if start == 0 else reduced[block] + part

            if rules is not None:
                start = _start_relevance(program, fwd.outputs, score_of)
                lowest = None if needs.input_relevance else sites[needs.relevance_lowest]
                relevance = engine.propagate(fwd, start, rules, preset, lowest_site=lowest,
                                             collect=frozenset() if input_point is None else frozenset({input_point}),
                                             on_attention=reduce_block if streams else None)
            attention = [fwd.attention[s] for s in sites]
            attention_relevance = {b: relevance.attention[s] for b, s in enumerate(sites) if s in relevance.attention}
            if layout is not None:          # window attention -> one matrix over each block's tokens
                attention = [layout.globalize(b, a, prepared.batch) for b, a in enumerate(attention)]
                grads = {b: layout.globalize(b, g, prepared.batch) for b, g in grads.items()}
                attention_relevance = {b: layout.globalize(b, r, prepared.batch)
                                       for b, r in attention_relevance.items()}
            valid = prepared.valid
            if fused:
                num_tokens, last_tokens, like = _keys(fwd, sites[0]), _keys(fwd, sites[-1]), fwd.attention_out[sites[-1]]
            else:
                first, last = attention[0], attention[-1]
                assert first is not None and last is not None        # kept by an unfused forward
                num_tokens, last_tokens, like = first.shape[-1], last.shape[-1], last
            if valid is None:
                valid = torch.ones(prepared.batch, num_tokens, dtype=torch.bool, device=self.device)
            prefix = self.family.prefix_tokens(self.model) if self.family.modality == "image" else 0
            content = torch.arange(prefix, num_tokens, device=self.device)
            trace = Trace(attention=attention, attention_grad=grads, attention_relevance=attention_relevance,
                          rows=[None] * num_blocks, valid=valid, content=content, token=0,
                          readout=_readout_weights(self.family.readout(self.model), prefix, last_tokens, like,
                                                   prepared.batch, prepared.valid),
                          parents=None if layout is None else layout.parents, reduced=reduced)
            if input_point is not None:
                trace.input_relevance = self._input_relevance(relevance.at[input_point])
            maps = []
            for method, method_options in methods:
                scores = method(trace, **method_options)
                if not method.input_level:
                    scores = scores[:, content]
                if self.family.modality == "text":
                    scores = scores.masked_fill(~valid, 0)
                maps.append(scores)
        internals = Internals(trace.attention, grads, attention_relevance) if keep_internals else None
        return maps, output, target_index, internals

    def _by_gradient(self, chosen, options: dict, needs, program: Program, prepared: Prepared, target: TargetLike):
        """AttnLRP / CP-LRP: one forward with the rule set's modified backward (`gradient_rules`),
        one backward from the explained score to the token embeddings; relevance = embedding x
        gradient, summed over the hidden dimension."""
        from .gradient_rules import get_gradient_rule_set

        rules = get_gradient_rule_set(needs.gradient_rules)
        point = self._token_point(program)
        with torch.inference_mode(False), torch.enable_grad():
            fwd = engine.forward(program, prepared.kwargs, self.weights, self.dtype, keep=frozenset({point}),
                                 gradient_rules=rules, biases=needs.biases, leaf=point)
            output = _unflatten(program, fwd.outputs)
            score_of, target_index = self._score_function(target, output, prepared.batch, prepared.valid)
            embedded = fwd.values[point]
            (grad,) = torch.autograd.grad(score_of(output).sum(), embedded, allow_unused=True)
        with torch.no_grad():
            relevance = torch.zeros_like(embedded) if grad is None else embedded.detach() * grad
            output = _unflatten(program, [o.detach() if isinstance(o, torch.Tensor) else o for o in fwd.outputs])
            prefix = self.family.prefix_tokens(self.model) if self.family.modality == "image" else 0
            if self.family.modality == "image":          # [B, D, h, w] patch embeddings -> [B, patches]
                patches = relevance.sum(dim=1).flatten(1)
                tokens_relevance = torch.cat([patches.new_zeros(prepared.batch, prefix), patches], 1)
            else:
                tokens_relevance = relevance.sum(dim=-1)
            num_tokens = tokens_relevance.shape[1]
            valid = prepared.valid
            if valid is None:
                valid = torch.ones(prepared.batch, num_tokens, dtype=torch.bool, device=self.device)
            content = torch.arange(prefix, num_tokens, device=self.device)
            trace = Trace(attention=[], attention_grad={}, attention_relevance={}, rows=[], valid=valid,
                          content=content, input_relevance=tokens_relevance)
            scores = chosen(trace, **options)[:, content]
            if self.family.modality == "text":
                scores = scores.masked_fill(~valid, 0)
        return scores, output, target_index

    def _word_embedding_path(self) -> str:
        """The module path of the model's word embedding (``get_input_embeddings()``)."""
        word = self.model.get_input_embeddings()
        return next(name for name, module in self.model.named_modules() if module is word)

    def _token_point(self, program: Program) -> int:
        """The step whose relevance, summed over the hidden dimension, is a token's: the word
        embedding lookup (text: position and token-type embeddings keep their own share), or
        the patch embedding's convolution of the pixels (images)."""
        if self.family.modality == "image":
            convs = [s.index for s in program.steps if s.data and s.kind == "conv"
                     and (not self.family.scope or s.module.startswith(self.family.scope))]
            if not convs:
                raise UnsupportedModelError(f"cannot find the patch embedding of {type(self.model).__name__} "
                                            "in its exported graph")
            return convs[0]
        path = self._word_embedding_path()
        lookups = [s.index for s in program.steps if s.kind == "embedding" and s.data
                   and s.module.split(" ")[0] == path]
        if not lookups:
            raise UnsupportedModelError(f"cannot find the word embeddings ({path}) in the exported graph")
        return lookups[0]

    def _layout(self, fwd: engine.Pass, sites: list[int], prepared: Prepared) -> Optional[tokens.Layout]:
        """The token layout of a hierarchical family (see `relprop.tokens`); None for the others."""
        if self.family.token_grids is None:
            return None
        grids = self.family.token_grids(self.model, prepared.extras["grid"])
        steps = [fwd.program.attention_sites[s] for s in sites]
        return tokens.layout(fwd, steps, grids, prepared.batch, type(self.model).__name__)

    def logits(self, inputs: Any) -> torch.Tensor:
        """The model's logits as relprop computes them (equal to the model's own).

        Parameters
        ----------
        inputs
            As for `explain`.

        Returns
        -------
        torch.Tensor
            [B, classes]; for a causal language model, the next-token logits [B, vocabulary] at
            each sample's last real token.
        """
        program, prepared = self.program(inputs)
        with torch.no_grad():
            fwd = engine.forward(program, prepared.kwargs, self.weights, self.dtype)
            logits = self._logits(_unflatten(program, fwd.outputs), prepared.valid)
        if logits is None:
            raise InputError(f"{type(self.model).__name__} outputs no class scores")
        return logits

    def _logits(self, output, valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        scores = self._scores(output, valid)
        return None if scores is None else scores.detach()

    def _scores(self, output, valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The family's class scores [B, classes] in ``output`` (None: it has none); per-position
        scores (`registry.Family.scores_at`) are read at each sample's last real token."""
        field = self.family.logits
        if field is None:
            return None
        value = output if field == "" else (output[field] if isinstance(output, dict) else getattr(output, field))
        if self.family.scores_at == "last":
            rows = torch.arange(value.shape[0], device=value.device)
            value = value[rows, last_real(valid, value.shape[1], value.device).to(value.device)]
        return value

    def _input_point(self, program: Program) -> int:
        """The step whose relevance `lrp` reports: the pixels, or (text) the embeddings' output,
        where the authors' text code stops."""
        if self.family.modality == "image":
            return next(i for i, what, name in program.inputs if what == "input" and name == self.family.pixel_input)
        word_path = self._word_embedding_path()
        path = word_path.rpartition(".")[0]

        def inside_of(path):
            return [s.index for s in program.steps if s.data and (s.module.startswith(path + ".") or
                                                                   s.module.startswith(path + " "))]
        # an embeddings module (BERT's: words, positions, types, norm) ends where the encoder
        # starts; a decoder's word embedding sits in the decoder itself: its own output then
        if any(i in inside_of(path) for i in program.attention_sites):
            path = word_path
        inside = inside_of(path)
        if not inside:
            raise UnsupportedModelError(f"cannot find the embeddings ({path}) in the exported graph")
        return inside[-1]

    def _input_relevance(self, relevance: torch.Tensor) -> torch.Tensor:
        return relevance.sum(dim=1) if self.family.modality == "image" else relevance.sum(dim=-1)

    def _score_function(self, target: TargetLike, output, batch: int, valid: Optional[torch.Tensor]):
        """``(score_of, target_index)``: score_of(output) -> [B], the score each explanation is of."""
        if callable(target) and not isinstance(target, torch.Tensor):
            score_target = target

            def target_score(out):
                scores = score_target(out)
                if not isinstance(scores, torch.Tensor) or scores.shape != (batch,):
                    shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                    raise InputError(f"a callable target must return one score per sample (a tensor of shape "
                                     f"[{batch}]), got {shape}")
                return scores
            _check_finite(target_score(output).detach()[:, None])
            return target_score, None
        logits = self._logits(output, valid)
        if logits is None:
            raise InputError(f"{type(self.model).__name__} outputs no class scores, so a class target means "
                             "nothing; pass target=callable(model_output) -> one score per sample, e.g. "
                             "lambda out: out.pooler_output @ reference")
        _check_finite(logits)
        index = self._resolve_target(target, logits)

        rows = torch.arange(index.shape[0], device=index.device)

        def score_of(out):        # indexing, not gather: gather's backward would keep all the class scores
            return self._scores(out, valid)[rows, index]
        return score_of, index
    def _resolve_target(self, target: TargetLike, logits: torch.Tensor) -> torch.Tensor:
        batch, classes = logits.shape
        if target is None:
            return logits.argmax(dim=1)
        if isinstance(target, (str, numbers.Integral)):
            index = torch.full((batch,), self.class_index(cast(Union[int, str], target)),   # bools refused there
                               dtype=torch.long, device=logits.device)
        else:
            if not isinstance(target, torch.Tensor) and _has_names(target):   # names, or names and indices
                target = [self.class_index(t) for t in cast(Sequence, target)]
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
    key: Optional[tuple] = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, _version(t))
                                 for t in tensors)
    if key is not None and any(entry[-1] is None for entry in key):
        key = None
    return modules + tensors, key


def _check_finite(logits: torch.Tensor) -> None:
    bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"the model's logits are not finite for sample(s) {bad}; check the input's scale "
                         "and normalisation (use the model's image processor / tokenizer)")


def _read_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, as the graph reads them: detached (views, no copy)
    and floating ones in the compute dtype. Tensors made under ``torch.inference_mode`` are
    copied: autograd cannot use them."""
    weights = {}
    for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        for name, tensor in named:
            t = tensor.detach()
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            elif t.is_inference():
                t = t.clone()
            weights[name] = t
    return weights


READOUTS = ("cls", "mean", "cls+mean", "last")


def last_real(valid: Optional[torch.Tensor], length: int, device=None) -> torch.Tensor:
    """[B] index of each sample's last real token (the last where ``valid`` is True); without a
    mask, [1]: the last position."""
    if valid is None:
        return torch.tensor([length - 1], device=device)
    positions = torch.arange(valid.shape[1], device=valid.device)
    return torch.where(valid, positions, -1).amax(dim=1)


def _keys(fwd: engine.Pass, site: int) -> int:
    """How many tokens a fused SDPA site attends over (its key count)."""
    step = fwd.program.steps[fwd.program.attention_sites[site]]
    return fwd.shapes[step.args[1].index][-2]


def _attention_grad(fwd: engine.Pass, site: int, out_grad: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """∇A of query heads start..stop of a fused SDPA site from its output's gradient: O = A·V,
    so ∇A = ∇O · Vᵀ."""
    step = fwd.program.steps[fwd.program.attention_sites[site]]
    q, k, v = (fwd.values[a.index] for a in step.args[:3])
    groups = engine.head_groups(q, k, step.kwargs.get("enable_gqa"))
    return out_grad[..., start:stop, :, :] @ engine.kv_heads_of(v, start, stop, groups).transpose(-1, -2)


def _readout_weights(readout: str, prefix: int, num_tokens: int, like: torch.Tensor, batch: int,
                     valid: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """[B, N_last] weights of the last block's rows that make the pooled row (`registry.Family.readout`;
    prefix tokens other than [CLS] never take part); None for the [CLS] row alone."""
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; one of {READOUTS}")
    if readout == "cls":
        return None
    last = like                     # the weights' dtype and device
    if readout == "last":
        index = last_real(valid, num_tokens, last.device).to(last.device).expand(batch)
        return torch.nn.functional.one_hot(index, num_tokens).to(last.dtype)
    # the content tokens, equally; real (non-padding) ones where the last block has the input's tokens
    counted = torch.ones(batch, num_tokens, dtype=torch.bool, device=last.device)
    if valid is not None and valid.shape[-1] == num_tokens:
        counted = valid.clone()
    counted[:, :prefix] = False
    weights = counted.to(last.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True)
    if readout == "cls+mean":
        weights = weights / 2
        weights[:, 0] = 0.5
    return weights


def _merged(needs: Sequence[Requirements]) -> Requirements:
    """What several methods of one pass need together (they share ``relevance_rules`` or need none)."""
    rules = {n.relevance_rules for n in needs} - {None}
    assert len(rules) <= 1, "one relevance rule set per pass"
    lowest = [n.relevance_lowest for n in needs if n.relevance_lowest is not None]
    return Requirements(gradient_blocks=set().union(*(n.gradient_blocks for n in needs)),
                        relevance_rules=next(iter(rules), None), relevance_lowest=min(lowest) if lowest else None,
                        input_relevance=any(n.input_relevance for n in needs), all_rows=any(n.all_rows for n in needs))


def _kept_values(program: Program, rules) -> frozenset:
    """Steps whose values the relevance rules read (all others are freed during the forward)."""
    from .oprules import NEEDS

    keep = set(engine.forks(program))
    for step in program.steps:
        if not step.data or not step.data_inputs:
            continue
        inputs, output = NEEDS.get(step.kind or "", (False, False))
        if inputs:
            keep.update(step.data_inputs)
        if output:
            keep.add(step.index)
    return frozenset(keep)


def _unflatten(program: Program, flat: list):
    import torch.utils._pytree as pytree
    return pytree.tree_unflatten(list(flat), program.out_spec)


def _start_relevance(program: Program, flat: list, score_of) -> dict[int, torch.Tensor]:
    """The relevance at the model's outputs: the gradient of the explained score (for a class
    index, a one-hot of 1 at the target logit, as the authors' code starts)."""
    leaves = [o.detach().requires_grad_(True) if isinstance(o, torch.Tensor) and o.is_floating_point() else o
              for o in flat]
    wanted = [(i, leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    with torch.enable_grad():
        scores = score_of(_unflatten(program, leaves))
        grads = torch.autograd.grad(scores.sum(), [leaf for _, leaf in wanted], allow_unused=True)
    return {index: g for (i, _), g in zip(wanted, grads) if g is not None
            and (index := program.outputs[i]) is not None}
