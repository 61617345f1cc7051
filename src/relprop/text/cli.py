"""``relprop explain-text``: explain a text classifier's decision, word by word, or (``--generate
N``) what a causal language model generates, token by token."""
from __future__ import annotations

import sys
from pathlib import Path

from ..loading import SENTIMENT, TINY_LM, model_help


def register(subparsers) -> None:
    from ..attributions import method_names
    from ..cli import positive_int

    parser = subparsers.add_parser("explain-text", help="explain a text classification, word by word")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="the text to explain")
    source.add_argument("--file", help="a UTF-8 text file to explain (one document)")
    parser.add_argument("--model", default=SENTIMENT,
                        help=f"{model_help('text', 'generate')} (default {SENTIMENT}; --generate needs a causal "
                             f"language model, e.g. {TINY_LM})")
    parser.add_argument("--method", choices=method_names(),
                        help="default: transformer_attribution; attnlrp with --generate")
    parser.add_argument("--target", help="class index or label to explain (default: the prediction)")
    parser.add_argument("--aggregate", choices=["max", "sum"], default="max", help="sub-word -> word (default max)")
    parser.add_argument("--long-text", choices=["truncate", "windows"], default="truncate",
                        help="text longer than the model's limit: truncate (warns) or overlapping windows")
    parser.add_argument("--generate", type=positive_int, metavar="N",
                        help="a causal language model: generate up to N tokens greedily from the text and "
                             "explain each over the text and the tokens before it")
    parser.add_argument("--out", help="folder for explanation.html and explanation.json "
                                      "(generation.html and generation.json with --generate)")
    parser.set_defaults(run=run)


def run(args) -> int:
    import warnings

    from ..cli import _parse_target
    from ..errors import RelpropError
    from ..explainer import Explainer
    from ..files import atomic_write_text, output_dir
    from ..loading import load_text_classifier
    from .explain import explain_text
    from .views import to_ansi, to_html, to_json

    if args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RelpropError(f"cannot read {args.file!r}: {error}") from None
    else:
        text = args.text
    if not text.strip():
        raise RelpropError("the text is empty")
    if args.generate:
        return _run_generate(args, text)
    out = output_dir(args.out) if args.out else None    # refuse a bad --out before the slow part
    model, tokenizer = load_text_classifier(args.model)
    explainer = Explainer(model)
    target = _parse_target(args.target, explainer.labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [exp] = explain_text(explainer, tokenizer, text, args.method or "transformer_attribution", target=target, aggregate=args.aggregate,
                             long_text=args.long_text)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(to_ansi(exp) if sys.stdout.isatty() else _plain(exp))
    if out is not None:
        atomic_write_text(out / "explanation.html", to_html([exp]))
        atomic_write_text(out / "explanation.json", to_json([exp]))
        print(f"wrote {out / 'explanation.html'} and {out / 'explanation.json'}")
    return 0


def _run_generate(args, text: str) -> int:
    from ..errors import UsageError
    from ..explainer import Explainer
    from ..files import atomic_write_text, output_dir
    from ..loading import bundled_model, load_causal_lm
    from .generate import DEFAULT_METHOD, explain_generation

    if args.target is not None:
        raise UsageError("--target cannot be used with --generate: each generated token is its own target")
    if args.long_text != "truncate":
        raise UsageError("--long-text cannot be used with --generate: the prompt must fit the model")
    bundled = bundled_model(args.model)
    if bundled is not None and bundled.name == SENTIMENT:     # also explain-text's default --model
        raise UsageError(f"--generate needs a causal language model: pass --model DIR or --model {TINY_LM} "
                         f"(the bundled {SENTIMENT} is a sentiment classifier)")
    out = output_dir(args.out) if args.out else None    # refuse a bad --out before the slow part
    model, tokenizer = load_causal_lm(args.model)
    result = explain_generation(Explainer(model), tokenizer, text, max_new_tokens=args.generate,
                                method=args.method or DEFAULT_METHOD)
    print(result.to_ansi() if sys.stdout.isatty() else _plain_generation(result))
    if out is not None:
        import json

        atomic_write_text(out / "generation.html", result.to_html())
        atomic_write_text(out / "generation.json", json.dumps(result.to_json(), indent=1))
        print(f"wrote {out / 'generation.html'} and {out / 'generation.json'}")
    return 0


def _plain_generation(result) -> str:
    import numpy as np

    lines = [f"[{result.method}] generated: {result.generated_text!r}"]
    context = result.context_tokens
    for token, row in zip(result.generated_tokens, result.matrix):
        best = int(np.nanargmax(row))
        lines.append(f"{token!r}: most relevant {context[best]!r} ({row[best]:.3g})")
    return "\n".join(lines)


def _plain(exp) -> str:
    top = sorted(exp.words, key=lambda w: -w.relevance)[:10]
    ranked = ", ".join(f"{w.text} ({w.relevance:.3g})" for w in top)
    return f"[{exp.method}] class {exp.label} (p={exp.probabilities[exp.target]:.3f})\ntop words: {ranked}"


