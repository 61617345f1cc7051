"""Views of a text explanation: self-contained HTML, coloured terminal output, JSON."""
from __future__ import annotations

import html
import json
from typing import Sequence

import numpy as np


def _scaled(values: Sequence[float]) -> np.ndarray:
    """Relevance in [-1, 1], scaled by the largest magnitude (0 stays white)."""
    array = np.nan_to_num(np.asarray(values, dtype=float))
    peak = np.abs(array).max() if array.size else 0.0
    return array / peak if peak > 0 else np.zeros_like(array)


def _rgb(value: float) -> tuple[int, int, int]:
    """Positive -> red, negative -> blue, intensity by magnitude."""
    fade = int(round(255 * (1 - min(1.0, abs(value)))))
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def to_html(explanations, title: str = "relprop explanation") -> str:
    """A standalone HTML page; every piece of user text is escaped."""
    blocks = []
    for exp in explanations:
        scaled = _scaled([w.relevance for w in exp.words])
        pieces, cursor = [], 0
        for word, value in zip(exp.words, scaled):
            pieces.append(html.escape(exp.text[cursor:word.start]))
            r, g, b = _rgb(value)
            pieces.append(f'<span class="w" style="background:rgb({r},{g},{b})" '
                          f'title="{html.escape(f"{word.relevance:.4g}", quote=True)}">{html.escape(word.text)}</span>')
            cursor = word.end
        pieces.append(html.escape(exp.text[cursor:]))
        prob = exp.probabilities[exp.target] if exp.target < len(exp.probabilities) else float("nan")
        blocks.append(f'<div class="exp"><div class="meta">{html.escape(exp.method)} &middot; class '
                      f'<strong>{html.escape(str(exp.label))}</strong> (p={prob:.3f})</div>'
                      f'<p class="text">{"".join(pieces)}</p></div>')
    return page("".join(blocks), title)


def page(body: str, title: str, style: str = "") -> str:
    """A standalone HTML page around ``body`` (already escaped) with the text views' style."""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}.text{line-height:1.8;"
            "white-space:pre-wrap}.w{border-radius:3px;padding:0 1px}.meta{color:#555;font-size:90%}"
            ".exp{border-bottom:1px solid #ddd;padding:0.5em 0}" + style + "</style></head><body>"
            + body + "</body></html>\n")


def to_ansi(exp) -> str:
    """The text with each word's background coloured by relevance (24-bit ANSI colours)."""
    scaled = _scaled([w.relevance for w in exp.words])
    out, cursor = [], 0
    for word, value in zip(exp.words, scaled):
        out.append(exp.text[cursor:word.start])
        r, g, b = _rgb(value)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{word.text}\x1b[0m")
        cursor = word.end
    out.append(exp.text[cursor:])
    prob = exp.probabilities[exp.target]
    return f"[{exp.method}] class {exp.label} (p={prob:.3f})\n" + "".join(out)


def to_json(explanations) -> str:
    return json.dumps([exp.to_json() for exp in explanations], indent=1)
