"""Downloads of the current view (overlay PNG, the map as .npy or JSON, a self-contained HTML
report) and the bundled test canvases the page offers as inputs."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import views
from .models import ServedModel

EXPORTS = ("png", "npy", "json", "html")


# ---------------------------------------------------------------------------------------- canvases
#: the first test canvases as PNG files (`write_bundled_canvases`), for machines without Fashion-MNIST
BUNDLED_CANVASES = Path(__file__).resolve().parent.parent / "assets" / "test_canvases"


def canvas_list(count: int) -> dict:
    """The first ``count`` cluttered Fashion-MNIST test canvases (`relprop.datasets`, as the demo
    makes them) when the data is installed, else the bundled copies of the first ones; empty,
    with a note, when there are neither."""
    from ..datasets import CLASS_NAMES, make_canvas

    try:
        labels = [make_canvas("test", i)[2] for i in range(count)]
        return {"canvases": [{"index": i, "label": CLASS_NAMES[label]} for i, label in enumerate(labels)],
                "note": None}
    except (OSError, ValueError) as error:
        bundled = _bundled_labels()[:count]
        if bundled:
            return {"canvases": [{"index": i, "label": label} for i, label in enumerate(bundled)],
                    "note": "Fashion-MNIST is not installed: these are the bundled copies of the first test canvases"}
        return {"canvases": [], "note": f"no test canvases: Fashion-MNIST is not installed ({error}); install "
                                        "Debian's dataset-fashion-mnist or set RELPROP_FASHION_MNIST"}


def _bundled_labels() -> list[str]:
    try:
        return list(json.loads((BUNDLED_CANVASES / "labels.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


def canvas_image(index: int, count: int):
    from PIL import Image

    from ..datasets import make_canvas

    if not 0 <= index < count:
        raise InputError(f"canvas must be in 0..{count - 1}, got {index}")
    try:
        image, _, _ = make_canvas("test", index)
    except (OSError, ValueError) as error:
        bundled = BUNDLED_CANVASES / f"{index:02d}.png"
        if not bundled.is_file():
            raise InputError(f"the test canvases need Fashion-MNIST (dataset-fashion-mnist): {error}") from None
        with Image.open(bundled) as picture:
            return picture.convert("RGB")
    return Image.fromarray(image).convert("RGB")


def write_bundled_canvases(count: int, folder: Path = BUNDLED_CANVASES) -> None:
    """Save the first ``count`` test canvases as PNG files and their labels (needs Fashion-MNIST,
    Expat licence): ``python -c "from relprop.serve.export import write_bundled_canvases as w; w(12)"``."""
    from PIL import Image

    from ..datasets import CLASS_NAMES, make_canvas

    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for index in range(count):
        image, _, label = make_canvas("test", index)
        Image.fromarray(image).save(folder / f"{index:02d}.png", optimize=True)
        labels.append(CLASS_NAMES[label])
    (folder / "labels.json").write_text(json.dumps(labels) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- exports
def export(served: ServedModel, given: Any, payload: dict, kind: str) -> tuple[bytes, str, str]:
    """(content, media type, file name) of one download of the current view."""
    if kind not in EXPORTS:
        raise InputError(f"unknown export {str(kind)[:20]!r}; one of {', '.join(EXPORTS)}")
    if kind == "html":
        return report(served, given, payload).encode("utf-8"), "text/html; charset=utf-8", "relprop-report.html"
    method = views.check_method(payload.get("method"))
    image = served.kind == "image"
    view = (views.image_explain if image else views.text_explain)(served, given, payload.get("target"), [method])
    entry = view["maps"][0]
    stem = f"relprop_{method}_class{view['target']}"
    if kind == "png":
        if not image:
            raise InputError("the PNG overlay is for images; export a text map as .npy, JSON or HTML")
        overlay = entry["overlay"].split(",", 1)[1]
        return base64.b64decode(overlay), "image/png", stem + ".png"
    values = entry["grid"] if image else [t["relevance"] for t in entry["tokens"]]
    array = np.array([[np.nan if v is None else v for v in row] for row in values] if image else
                     [np.nan if v is None else v for v in values], dtype=np.float64)
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue(), "application/octet-stream", stem + ".npy"
    record = {"model": served.name, "method": method, "target": view["target"], "label": view["label"],
              "classes": view["classes"]}
    if image:
        record["grid"] = entry["grid"]
    else:
        record.update(text=view["text"], words=entry["words"], tokens=entry["tokens"])
    return json.dumps(record, indent=1).encode("utf-8"), "application/json", stem + ".json"


def _img(data_url: str, alt: str) -> str:
    if not data_url.startswith("data:image/png;base64,"):
        raise ValueError("not a PNG data URL")
    return f'<img src="{html.escape(data_url, quote=True)}" alt="{html.escape(alt, quote=True)}">'


def _words_html(text: str, words: list[dict]) -> str:
    from ..text.views import _rgb, _scaled

    scaled = _scaled([w["relevance"] or 0.0 for w in words])
    pieces, cursor = [], 0
    for word, value in zip(words, scaled):
        pieces.append(html.escape(text[cursor:word["start"]]))
        r, g, b = _rgb(value)
        score = "n/a" if word["relevance"] is None else f"{word['relevance']:.4g}"
        pieces.append(f'<span style="background:rgb({r},{g},{b})" title="{html.escape(score, quote=True)}">'
                      f'{html.escape(word["text"])}</span>')
        cursor = word["end"]
    pieces.append(html.escape(text[cursor:]))
    return f'<p class="text">{"".join(pieces)}</p>'


def report(served: ServedModel, given: Any, payload: dict) -> str:
    """A standalone HTML page of the current view: the input, its classes, the chosen maps,
    and (when the request names them) the inside view's panels and the what-if curve. Every
    piece of text is escaped; images are data: URLs, so the file needs nothing else."""
    image = served.kind == "image"
    methods = views.check_methods(payload.get("methods"))
    target = payload.get("target")
    view = (views.image_explain if image else views.text_explain)(served, given, target, methods)
    esc = html.escape
    parts = [f"<h1>relprop: {esc(served.name)}</h1>",
             f"<p>explained class: <strong>{esc(view['label'])}</strong> (index {view['target']})</p>",
             "<table class='classes'><tr><th>class</th><th>probability</th></tr>"
             + "".join(f"<tr><td>{esc(c['label'])}</td><td>{c['probability']:.4f}</td></tr>" for c in view["classes"])
             + "</table>"]
    if image:
        parts.append("<h2>input</h2>" + _img(views.png_data_url(views.enlarged(given.display)), "input image"))
    parts.append("<h2>methods</h2><div class='grid'>")
    for entry in view["maps"]:
        body = _img(entry["overlay"], entry["method"]) if image else _words_html(view["text"], entry["words"])
        parts.append(f"<figure>{body}<figcaption>{esc(entry['method'])}</figcaption></figure>")
    parts.append("</div>")
    inside = payload.get("inside")
    if isinstance(inside, dict):
        method = views.check_method(inside.get("method"))
        args = (target, method, inside.get("block"), inside.get("head", "mean"), inside.get("row", 0))
        data = views.image_inside(served, given, *args) if image else views.text_inside(served, given, *args)
        parts.append(f"<h2>inside: {esc(data['method'])}, block {data['block']}, head {esc(str(data['head']))}, "
                     f"row {data['row']}</h2>")
        if data["note"]:
            parts.append(f"<p>{esc(data['note'])}</p>")
        parts.append("<div class='grid'>")
        for panel in data["panels"]:
            if "missing" in panel:
                parts.append(f"<figure><p>{esc(panel['missing'])}</p><figcaption>{esc(panel['name'])}</figcaption></figure>")
                continue
            shown = _img(panel["overlay"], panel["name"]) if "overlay" in panel else ""
            parts.append(f"<figure>{shown}{_img(panel['matrix'], panel['name'] + ' matrix')}"
                         f"<figcaption>{esc(panel['name'])}</figcaption></figure>")
        parts.append("</div>")
    whatif = payload.get("whatif")
    if isinstance(whatif, dict):
        method = views.check_method(whatif.get("method"))
        percent, mode = whatif.get("percent"), whatif.get("mode", "top")
        data = (views.image_whatif(served, given, target, method, percent, mode) if image
                else views.text_whatif(served, given, target, method, percent, mode))
        parts.append(f"<h2>what-if: {esc(data['mode'])} {data['percent']}% removed by {esc(method)}</h2>"
                     "<table><tr><th>removed</th><th>prediction</th><th>p(prediction)</th><th>p(explained class)</th></tr>"
                     + "".join(f"<tr><td>{p['percent']}%</td><td>{esc(p['label'])}</td><td>{p['probability']:.4f}</td>"
                               f"<td>{p['target_probability']:.4f}</td></tr>" for p in data["curve"]) + "</table>")
        if image:
            parts.append(_img(data["image"], "perturbed image"))
        else:
            parts.append(f"<p class='text'>{esc(data['kept_text'])}</p>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}.grid{display:flex;flex-wrap:wrap;gap:1em}"
             "figure{margin:0}figcaption{text-align:center;color:#444}td,th{padding:2px 8px;text-align:left}"
             ".text{line-height:1.8;white-space:pre-wrap;max-width:40em}img{image-rendering:pixelated}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>relprop report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
