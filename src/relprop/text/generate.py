"""Explaining generated text: greedy generation with a causal language model, then each
generated token explained over the prompt and the tokens generated before it (a matrix).

Generation uses `relprop.Explainer.logits` (not ``model.generate``), so the tokens explained are
exactly the ones relprop's own forward pass picks.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import InputError, UnsupportedModelError

# AttnLRP (Achtibat et al., ICML 2024) is the rule set made for, and exact against LXT on, decoder
# LMs: one modified backward pass, the most faithful of the methods in its authors' LLM benchmark.
DEFAULT_METHOD = "attnlrp"


@dataclass
class GenerationExplanation:
    """Each generated token's relevance over its context (the prompt + the tokens before it).

    Attributes
    ----------
    prompt : str
        The prompt as given.
    method : str
        The explanation method.
    prompt_ids : list of int
        The prompt's token ids (special tokens the tokenizer adds included).
    prompt_tokens : list of str
        The prompt's tokens, each decoded on its own (what the views show).
    generated_ids : list of int
        The generated token ids, in order.
    generated_tokens : list of str
        The generated tokens, each decoded on its own.
    generated_text : str
        The generated tokens decoded together.
    matrix : numpy.ndarray
        float64 [N, P + N - 1] for N generated and P prompt tokens: row t is the relevance of
        generated token t's logit over the prompt and ``generated[:t]``; the columns past its
        context (``P + t`` on) are NaN: not in the context, as opposed to a relevance of 0.
    stopped_at_eos : bool
        Whether generation ended at an end-of-sequence token (the last generated one).
    """

    prompt: str
    method: str
    prompt_ids: list[int]
    prompt_tokens: list[str]
    generated_ids: list[int]
    generated_tokens: list[str]
    generated_text: str
    matrix: np.ndarray
    stopped_at_eos: bool = False

    @property
    def context_tokens(self) -> list[str]:
        """The column labels: the prompt tokens then every generated token but the last."""
        return self.prompt_tokens + self.generated_tokens[:-1]

    def to_json(self) -> dict:
        """A JSON-ready dict; the matrix's NaN (not in context) become null."""
        return {
            "prompt": self.prompt, "method": self.method, "generated_text": self.generated_text,
            "stopped_at_eos": self.stopped_at_eos,
            "prompt_tokens": [{"id": i, "token": t} for i, t in zip(self.prompt_ids, self.prompt_tokens)],
            "generated_tokens": [{"id": i, "token": t} for i, t in zip(self.generated_ids, self.generated_tokens)],
            "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in self.matrix],
        }

    def to_html(self, title: str = "relprop: explaining generated text") -> str:
        """A standalone HTML heat map: a row per generated token, a column per context token,
        each row scaled by its own largest magnitude (red positive, blue negative)."""
        from .views import _rgb, _scaled, page

        head = "".join(f'<th class="c">{_escaped_token(t)}</th>' for t in self.context_tokens)
        rows = []
        for token, values in zip(self.generated_tokens, self.matrix):
            scaled = _scaled(values)
            cells = []
            for value, shade in zip(values, scaled):
                if np.isnan(value):
                    cells.append('<td class="out"></td>')
                    continue
                r, g, b = _rgb(shade)
                cells.append(f'<td style="background:rgb({r},{g},{b})" title="{value:.4g}"></td>')
            rows.append(f'<tr><th class="r">{_escaped_token(token)}</th>{"".join(cells)}</tr>')
        meta = (f'<div class="meta">{html.escape(self.method)} &middot; prompt: '
                f'<strong>{_escaped_token(self.prompt)}</strong> &middot; generated: '
                f'<strong>{_escaped_token(self.generated_text)}</strong></div>')
        table = (f'<table class="gen"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
                 '<p class="meta">rows: generated tokens; columns: their context (prompt, then the tokens '
                 'generated before); grey: not in the row\'s context</p>')
        style = (".gen{border-collapse:collapse;font-size:85%}.gen td{min-width:1.4em;height:1.4em;"
                 "border:1px solid #eee}.gen td.out{background:#ddd}.gen th.c{writing-mode:vertical-rl;"
                 "font-weight:normal;white-space:pre}.gen th.r{text-align:right;font-weight:normal;white-space:pre}")
        return page(meta + table, title, style)

    def to_ansi(self, top_k: int = 5) -> str:
        """Terminal view: per generated token, its ``top_k`` most relevant context tokens, each
        coloured by its relevance (24-bit ANSI colours)."""
        from .views import _rgb, _scaled

        context = self.context_tokens
        lines = [f"[{self.method}] {self.prompt!r} -> {self.generated_text!r}"]
        for t, (token, values) in enumerate(zip(self.generated_tokens, self.matrix)):
            row = values[:len(self.prompt_ids) + t]
            scaled = _scaled(row)
            ranked = np.argsort(-row, kind="stable")[:top_k]
            shown = []
            for index in ranked:
                r, g, b = _rgb(scaled[index])
                shown.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{context[index]!r}\x1b[0m ({row[index]:.3g})")
            lines.append(f"{token!r:>14} <- " + ", ".join(shown))
        return "\n".join(lines)


def _escaped_token(text: str) -> str:
    # a token of white space alone would vanish in HTML: show it visibly
    return html.escape(text if text.strip() else repr(text))


def explain_generation(explainer, tokenizer, prompt: str, max_new_tokens: int = 20,
                       method: str = DEFAULT_METHOD, *, batch_size: int = 8, **options) -> GenerationExplanation:
    """Generate greedily from ``prompt``, then explain each generated token.

    Parameters
    ----------
    explainer : relprop.Explainer
        An explainer of a supported causal language model (GPT-2, Llama, Qwen2, Mistral, Gemma).
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer; the prompt is encoded with its special tokens (e.g. a BOS).
    prompt : str
        The text to continue.
    max_new_tokens : int
        The most tokens to generate; generation stops earlier at an end-of-sequence token
        (the tokenizer's or the model config's), which is generated and explained too.
    method : str
        One of `relprop.methods()`; default ``"attnlrp"``, the rule set made for decoder LMs.
    batch_size : int
        Explanations per pass (rows right-padded to the longest).
    **options
        The method's options.

    Returns
    -------
    GenerationExplanation
        Row t of its matrix equals ``explainer.explain(prompt + generated[:t], method,
        target=generated[t]).relevance``, NaN past that context.

    Raises
    ------
    UnsupportedModelError
        The model is not a causal language model.
    InputError
        An empty prompt, ``max_new_tokens`` < 1, or a prompt + generation longer than the model's
        positions.
    """
    if explainer.family.scores_at != "last":
        raise UnsupportedModelError(f"explain_generation needs a causal language model (e.g. GPT2LMHeadModel, "
                                    f"LlamaForCausalLM); {type(explainer.model).__name__} is not one")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise InputError("the prompt is empty (no tokens): give some text to continue")
    limit = _position_limit(explainer.model)
    if limit is not None and len(prompt_ids) + max_new_tokens - 1 > limit:
        raise InputError(f"a prompt of {len(prompt_ids)} tokens + {max_new_tokens} new ones exceeds the model's "
                         f"{limit} positions; shorten the prompt or generate fewer tokens")
    stops = _eos_ids(tokenizer, explainer.model)
    generated, stopped = _greedy(explainer, prompt_ids, max_new_tokens, stops)
    matrix = _explain_rows(explainer, prompt_ids, generated, method, batch_size, options)
    decode = lambda i: tokenizer.decode([i])   # noqa: E731 -- each token on its own, as the views show it
    return GenerationExplanation(prompt=prompt, method=method, prompt_ids=prompt_ids,
                                 prompt_tokens=[decode(i) for i in prompt_ids], generated_ids=generated,
                                 generated_tokens=[decode(i) for i in generated],
                                 generated_text=tokenizer.decode(generated), matrix=matrix,
                                 stopped_at_eos=stopped)


def _position_limit(model) -> Optional[int]:
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _greedy(explainer, prompt_ids: list[int], max_new_tokens: int, stops: set[int]) -> tuple[list[int], bool]:
    """Greedy decoding with relprop's forward pass (the whole sequence each step: no cache)."""
    sequence, generated = list(prompt_ids), []
    for _ in range(max_new_tokens):
        ids = torch.tensor([sequence], device=explainer.device)
        logits = explainer.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        token = int(logits[0].argmax())
        generated.append(token)
        sequence.append(token)
        if token in stops:
            return generated, True
    return generated, False


def _explain_rows(explainer, prompt_ids, generated, method, batch_size, options) -> np.ndarray:
    """Row t: token generated[t] explained over prompt + generated[:t]; rows batched with right padding."""
    sequence = prompt_ids + generated
    width = len(sequence) - 1
    matrix = np.full((len(generated), width), np.nan)
    for start in range(0, len(generated), batch_size):
        rows = range(start, min(start + batch_size, len(generated)))
        lengths = [len(prompt_ids) + t for t in rows]
        longest = max(lengths)
        ids = torch.zeros(len(lengths), longest, dtype=torch.long)
        mask = torch.zeros(len(lengths), longest, dtype=torch.long)
        for row, length in enumerate(lengths):
            ids[row, :length] = torch.tensor(sequence[:length])
            mask[row, :length] = 1
        inputs = {"input_ids": ids.to(explainer.device), "attention_mask": mask.to(explainer.device)}
        result = explainer.explain(inputs, method, target=[generated[t] for t in rows], **options)
        relevance = result.relevance.detach().double().cpu().numpy()
        for row, (t, length) in enumerate(zip(rows, lengths)):
            matrix[t, :length] = relevance[row, :length]
    return matrix
