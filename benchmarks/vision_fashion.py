"""The paper's vision benchmarks, plus a class-specificity test, on cluttered Fashion-MNIST
canvases with relprop's bundled model (``src/relprop/assets/fmnist_vit``).

One command regenerates everything in ``benchmarks/results/vision_fashion/``:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/vision_fashion.py

* segmentation (pixel accuracy, mIoU, mAP; the item mask is the ground truth) on the first
  ``--n`` test canvases (canvas seed 0, the canvases the model's test accuracy is measured on);
* positive / negative perturbation AUC, explaining the predicted and the true class, on the
  same canvases;
* class specificity on the first ``--pairs`` two-item test canvases.

Protocol as the authors' ViT scripts (``imagenet_seg_eval.py``, ``generate_visualizations.py``):
transformer attribution and rollout with ``start_layer=1`` (``--start-layer``), other
methods with relprop's defaults; maps bilinearly upsampled from the patch grid; removed
pixels set to 0 in [0, 1] image space. Runs are resumable: rerunning skips finished records
(delete the output folder for a from-scratch timing). Needs ``apt-get install
dataset-fashion-mnist`` (or ``$RELPROP_FASHION_MNIST``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "src" / "relprop" / "assets" / "fmnist_vit"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "vision_fashion"
METHODS = ("transformer_attribution", "rollout", "raw_attention", "attn_gradcam", "partial_lrp", "lrp",
           "grad_rollout", "attnlrp", "cp_lrp")
PAPER_NAMES = {  # the rows of the paper's tables
    "transformer_attribution": "Ours (transformer attribution)", "rollout": "rollout",
    "raw_attention": "raw attention", "attn_gradcam": "GradCAM (attention)", "partial_lrp": "partial LRP",
    "lrp": "LRP", "grad_rollout": "grad rollout (not in the paper: Chefer et al., ICCV 2021)",
    "attnlrp": "AttnLRP (not in the paper: Achtibat et al., ICML 2024)",
    "cp_lrp": "CP-LRP (not in the paper: Ali et al., ICML 2022)",
}

# The paper's ImageNet numbers (ViT-B; segmentation on ImageNet-segmentation, perturbation AUC on
# the ImageNet validation set; percentages), for orientation only. Transcribed from the copy of the
# paper's tables in the ReScience C reproduction by Athanasiadis, Moschovis & Tuoma (2022,
# doi:10.5281/zenodo.6574631, Tables 2-3, "partly extracted from" arXiv:2012.09838); users quote
# some as the paper's in hila-chefer/Transformer-Explainability #31 (negative AUC of rollout and
# GradCAM) and #52 (both "predicted" AUCs of ours). The paper gives no target-class
# ("true") perturbation numbers for rollout and raw attention, and none for grad_rollout (ICCV'21).
PAPER_IMAGENET: dict[str, dict[str, float]] = {
    "transformer_attribution": {"pixel_accuracy": 79.70, "mAP": 86.03, "mIoU": 61.95,
                                "negative_predicted": 54.16, "negative_true": 55.04,
                                "positive_predicted": 17.03, "positive_true": 16.04},
    "rollout": {"pixel_accuracy": 73.54, "mAP": 84.76, "mIoU": 55.42,
                "negative_predicted": 53.10, "positive_predicted": 20.05},
    "raw_attention": {"pixel_accuracy": 67.84, "mAP": 80.24, "mIoU": 46.37,
                      "negative_predicted": 45.55, "positive_predicted": 23.99},
    "attn_gradcam": {"pixel_accuracy": 64.44, "mAP": 71.60, "mIoU": 40.82,
                     "negative_predicted": 41.52, "negative_true": 42.02,
                     "positive_predicted": 34.06, "positive_true": 33.56},
    "lrp": {"pixel_accuracy": 51.09, "mAP": 55.68, "mIoU": 32.89,
            "negative_predicted": 43.49, "negative_true": 43.49,
            "positive_predicted": 41.94, "positive_true": 41.93},
    "partial_lrp": {"pixel_accuracy": 76.31, "mAP": 84.67, "mIoU": 57.94,
                    "negative_predicted": 50.49, "negative_true": 50.49,
                    "positive_predicted": 19.64, "positive_true": 19.64},
}
PAPER_SOURCE = ("arXiv:2012.09838 Tables (ViT-B, ImageNet), as transcribed in the ReScience C reproduction "
                "doi:10.5281/zenodo.6574631")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder (save_pretrained)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: $RELPROP_FASHION_MNIST "
                                                     "or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--n", type=int, default=1000, help="test canvases for segmentation and perturbation")
    p.add_argument("--pairs", type=int, default=500, help="pair canvases for class specificity")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--start-layer", type=int, default=1,
                   help="start_layer of transformer_attribution and rollout (1 as in the authors' ViT scripts)")
    p.add_argument("--batch-size", type=int, default=50, help="images per explanation pass")
    p.add_argument("--forward-batch-size", type=int, default=450, help="perturbed images per forward pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=["segmentation", "perturbation", "class_specificity"],
                   help="run only these benchmarks (the report uses whatever summaries exist)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the stored results")
    p.add_argument("--restart", action="store_true",
                   help="move earlier results in --out (e.g. of other weights, or from before run records) into "
                        "previous-<time>/ folders and start over")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired comparisons")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args()


def _fmt(value: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def _best(values: dict[str, float | None], lower_is_better: bool = False) -> set[str]:
    known = {m: v for m, v in values.items() if v is not None}
    if not known:
        return set()
    target = min(known.values()) if lower_is_better else max(known.values())
    return {m for m, v in known.items() if abs(v - target) < 1e-12}


def _cell(method: str, value: float | None, best: set[str], text: str) -> str:
    return f"**{text}**" if method in best else text


def _paper(method: str, key: str) -> str:
    value = PAPER_IMAGENET.get(method, {}).get(key)
    return "n/a" if value is None else f"{value:.2f}"


def segmentation_table(summary: dict[str, Any]) -> str:
    res = summary["results"]
    keys = ("pixel_accuracy", "mIoU", "mAP")
    best = {k: _best({m: r[k] for m, r in res.items()}) for k in keys}
    lines = ["| method | pixel accuracy | mIoU | mAP | ImageNet (paper): pixel acc. / mIoU / mAP |",
             "|---|---:|---:|---:|---:|"]
    for m, r in res.items():
        cells = [_cell(m, r[k], best[k], _fmt(r[k])) for k in keys]
        paper = " / ".join(_paper(m, k) for k in keys)
        lines.append(f"| {m} | {' | '.join(cells)} | {paper} |")
    return "\n".join(lines)


def perturbation_table(predicted: dict[str, Any], true: dict[str, Any]) -> str:
    cols = [("positive", predicted, "predicted"), ("positive", true, "true"),
            ("negative", predicted, "predicted"), ("negative", true, "true")]
    aucs = {(mode, who): {m: e[mode]["auc"] / 100 if e[mode]["auc"] is not None else None
                          for m, e in summary["results"].items()}
            for mode, summary, who in cols}
    best = {key: _best(v, lower_is_better=key[0] == "positive") for key, v in aucs.items()}
    lines = ["| method | positive AUC, predicted ↓ | positive AUC, true ↓ | negative AUC, predicted ↑ "
             "| negative AUC, true ↑ | ImageNet (paper): pos. pred / pos. true / neg. pred / neg. true |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in predicted["results"]:
        cells = [_cell(m, aucs[(mode, who)][m], best[(mode, who)], _fmt(aucs[(mode, who)][m]))
                 for mode, _, who in cols]
        paper = " / ".join(_paper(m, k) for k in ("positive_predicted", "positive_true", "negative_predicted",
                                                   "negative_true"))
        lines.append(f"| {m} | {' | '.join(cells)} | {paper} |")
    return "\n".join(lines)


def class_specificity_table(summary: dict[str, Any]) -> str:
    res = summary["results"]
    best_share = _best({m: r["positive_share"] for m, r in res.items()})
    best_win = _best({m: r["win_rate"] for m, r in res.items()})
    best_sens = _best({m: r["sensitivity"] for m, r in res.items()})
    lines = ["| method | positive relevance on the explained item (%) | explained item gets more (%) "
             "| class sensitivity | same, pairs with both classes in the model's top 2: share / wins / sens. |",
             "|---|---:|---:|---:|---:|"]
    for m, r in res.items():
        t = r["top2"]
        sens = "-" if r["sensitivity"] is None else f"{r['sensitivity']:.3f}"
        t_sens = "-" if t["sensitivity"] is None else f"{t['sensitivity']:.3f}"
        lines.append(f"| {m} | {_cell(m, r['positive_share'], best_share, _fmt(r['positive_share'], digits=1))} "
                     f"| {_cell(m, r['win_rate'], best_win, _fmt(r['win_rate'], digits=1))} "
                     f"| {_cell(m, r['sensitivity'], best_sens, sens)} "
                     f"| {_fmt(t['positive_share'], digits=1)} / {_fmt(t['win_rate'], digits=1)} / {t_sens} |")
    return "\n".join(lines)


def plot_segmentation(summary: dict[str, Any], path: Path) -> None:
    res = {m: r for m, r in summary["results"].items() if r["n"]}
    keys = ("pixel_accuracy", "mIoU", "mAP")
    fig = Figure(figsize=(9, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        ax.bar([i + (k - 1) * width for i in range(len(res))], [100 * r[key] for r in res.values()], width,
               label=key)
    ax.set_xticks(range(len(res)))
    ax.set_xticklabels(list(res), rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"segmentation on {summary['samples']} Fashion canvases")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=len(keys))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


REFERENCE = "transformer_attribution"


def _records(jsonl: Path, cfg: str) -> dict[tuple, dict]:
    """Stored per-sample records of one run, keyed by (method, [mode,] id)."""
    out = {}
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        if r["cfg"] == cfg:
            out[(r["method"], r.get("mode"), r["id"])] = r
    return out


def paired_comparisons(out: Path, methods: list[str], resamples: int, seed: int = 0) -> dict[str, Any]:
    """Transformer attribution minus each other method, per metric, in percentage points,
    with a 95% paired bootstrap interval (the same resampled images for both methods)."""
    import numpy as np

    from relprop.eval.metrics import perturbation_auc

    rng = np.random.default_rng(seed)
    others = [m for m in methods if m != REFERENCE]
    metrics: dict[str, dict[str, Any]] = {}

    def add(metric: str, stat, per_method: dict[str, dict[str, np.ndarray]], n: int) -> None:
        idx = rng.integers(0, n, (resamples, n))
        ref_full, ref_boot = stat(per_method[REFERENCE], None), stat(per_method[REFERENCE], idx)
        metrics[metric] = {}
        for m in others:
            diff = 100 * (ref_full - stat(per_method[m], None))
            boot = 100 * (ref_boot - stat(per_method[m], idx))
            lo, hi = np.percentile(boot, [2.5, 97.5])
            metrics[metric][m] = {"diff": float(diff), "ci95": [float(lo), float(hi)]}

    def take(a: np.ndarray, idx) -> np.ndarray:  # per-sample array -> [resamples, n] (or [n])
        return a if idx is None else a[idx]

    summary = _read(out / "segmentation" / "segmentation_summary.json")
    if summary and REFERENCE in methods:
        recs = _records(out / "segmentation" / "segmentation.jsonl", summary["settings_id"])
        ids = [i for i in _ids(summary, recs, methods)]
        arrays = {m: {k: np.array([recs[(m, None, i)][k] for i in ids], dtype=np.float64)
                      for k in ("correct", "labelled", "ap")} |
                     {"inter": np.array([recs[(m, None, i)]["inter"] for i in ids], dtype=np.float64),
                      "union": np.array([recs[(m, None, i)]["union"] for i in ids], dtype=np.float64)}
                  for m in methods}
        add("segmentation pixel accuracy",
            lambda a, idx: take(a["correct"], idx).sum(-1) / take(a["labelled"], idx).sum(-1), arrays, len(ids))
        add("segmentation mIoU",
            lambda a, idx: (take(a["inter"], idx).sum(-2) / take(a["union"], idx).sum(-2)).mean(-1),
            arrays, len(ids))
        add("segmentation mAP", lambda a, idx: take(a["ap"], idx).mean(-1), arrays, len(ids))
    for target in ("predicted", "true"):
        summary = _read(out / f"perturbation_{target}" / "perturbation_summary.json")
        if not summary or REFERENCE not in methods:
            continue
        recs = _records(out / f"perturbation_{target}" / "perturbation.jsonl", summary["settings_id"])
        for mode in ("positive", "negative"):
            keyed = {(m, i): r for (m, md, i), r in recs.items() if md == mode}
            ids = sorted({i for (m, i) in keyed if all((mm, i) in keyed for mm in methods)})
            # The AUC is linear in the curve, so the mean of per-image AUCs is the AUC of the mean curve.
            arrays = {m: {"auc": np.array([perturbation_auc([keyed[(m, i)]["clean"], *keyed[(m, i)]["hits"]]) / 100
                                           for i in ids])} for m in methods}
            add(f"{mode} perturbation AUC, {target} class", lambda a, idx: take(a["auc"], idx).mean(-1),
                arrays, len(ids))
    summary = _read(out / "class_specificity" / "class_specificity_summary.json")
    if summary and REFERENCE in methods:
        recs = _records(out / "class_specificity" / "class_specificity.jsonl", summary["settings_id"])
        ids = _ids(summary, recs, methods)
        arrays = {}
        for m in methods:
            rs = [recs[(m, None, i)] for i in ids]
            arrays[m] = {
                "share_sum": np.array([sum(r[k] or 0.0 for k in ("share_a", "share_b")) for r in rs]),
                "share_n": np.array([sum(r[k] is not None for k in ("share_a", "share_b")) for r in rs], float),
                "win": np.array([(r["win_a"] + r["win_b"]) / 2 for r in rs]),
            }
        add("class specificity: positive relevance on the explained item",
            lambda a, idx: take(a["share_sum"], idx).sum(-1) / take(a["share_n"], idx).sum(-1), arrays, len(ids))
        add("class specificity: explained item gets more", lambda a, idx: take(a["win"], idx).mean(-1),
            arrays, len(ids))
    return {"reference": REFERENCE, "resamples": resamples, "seed": seed, "unit": "percentage points",
            "metrics": metrics}


def _ids(summary: dict[str, Any], recs: dict[tuple, dict], methods: list[str]) -> list[str]:
    """Sample ids that every method scored (sorted), for paired comparisons."""
    ids = {i for (_, _, i) in recs}
    return sorted(i for i in ids if all((m, None, i) in recs for m in methods))


def comparison_table(comparisons: dict[str, Any]) -> str:
    metrics = comparisons["metrics"]
    if not metrics:
        return ""
    others = list(next(iter(metrics.values())))
    lines = ["| metric | " + " | ".join(f"vs {m}" for m in others) + " |",
             "|---|" + "---:|" * len(others)]
    for metric, row in metrics.items():
        cells = [f"{row[m]['diff']:+.2f} [{row[m]['ci95'][0]:+.2f}, {row[m]['ci95'][1]:+.2f}]" for m in others]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import relprop
    from relprop.eval import fashion, loading
    from relprop.eval.class_specificity import ClassSpecificityConfig, run_class_specificity
    from relprop.eval.perturbation import PerturbationConfig, run_perturbation
    from relprop.eval.segmentation import SegmentationConfig, run_segmentation

    if not (args.model / "config.json").is_file():
        print(f"no model in {args.model}; train it with scripts/train_fmnist_vit.py", file=sys.stderr)
        return 2
    model = loading.load_model(str(args.model))
    preprocessor = loading.read_preprocessor_config(str(args.model))
    size, norm = loading.image_size(model, preprocessor), loading.normalization(preprocessor)
    options = {m: {"start_layer": args.start_layer} for m in ("transformer_attribution", "rollout")}
    explainer = relprop.Explainer(model)
    model_id = {"model": str(args.model.resolve()),
                "model_sha": _weights_fingerprint(args.model)}
    canvases = fashion.canvas_identity(root=args.data_root)
    identity = {**model_id, **canvases}
    progress = not args.no_progress
    only = set(args.only or ("segmentation", "perturbation", "class_specificity"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timing_path = out / "timing.json"
    timing = _read(timing_path) or {}

    def timed(name: str, fn):
        folder = out / ("perturbation_" + name.split("_", 1)[1] if name.startswith("perturbation") else name)
        resumed = not args.restart and any(p.stat().st_size for p in folder.glob("*.jsonl"))  # not a full run
        t0 = time.perf_counter()
        result = fn()
        wall = round(time.perf_counter() - t0, 1)
        print(f"{name}: {wall} s{' (resumed)' if resumed else ''}", flush=True)
        if not (resumed and name in timing and not timing[name]["resumed"]):  # keep a full run's time
            timing[name] = {"wall_s": wall, "threads": args.threads, "resumed": resumed,
                            "when": time.strftime("%Y-%m-%d %H:%M:%S")}
            timing_path.write_text(json.dumps(timing, indent=2) + "\n")
        return result

    if args.report_only:
        only = set()
    if "segmentation" in only:
        samples = fashion.canvas_segmentation(args.n, root=args.data_root)
        timed("segmentation", lambda: run_segmentation(
            model, explainer, samples, args.methods, out / "segmentation", SegmentationConfig(size, norm),
            identity, args.batch_size, progress, args.restart, options=options))
    if "perturbation" in only:
        samples = fashion.canvas_images(args.n, root=args.data_root)
        for target in ("predicted", "true"):
            config = PerturbationConfig(image_size=size, normalization=norm, target=target)
            timed(f"perturbation_{target}", lambda: run_perturbation(
                model, explainer, samples, args.methods, out / f"perturbation_{target}", config,
                {**identity, "labels": "fashion-mnist"}, args.batch_size, args.forward_batch_size, progress,
                args.restart, options=options))
    if "class_specificity" in only:
        pairs = fashion.pair_samples(args.pairs, root=args.data_root)
        timed("class_specificity", lambda: run_class_specificity(
            model, explainer, pairs, args.methods, out / "class_specificity", ClassSpecificityConfig(size, norm),
            {**identity, "data": "fashion_pairs"}, args.batch_size, progress, args.restart, options=options))

    report(args, out, timing, identity)
    return 0


def _weights_fingerprint(folder: Path) -> str:
    import hashlib

    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha1()
    for w in weights:
        digest.update(w.read_bytes())
    return digest.hexdigest()[:12]


def report(args: argparse.Namespace, out: Path, timing: dict[str, Any], identity: dict[str, Any]) -> None:
    seg = _read(out / "segmentation" / "segmentation_summary.json")
    pred = _read(out / "perturbation_predicted" / "perturbation_summary.json")
    true = _read(out / "perturbation_true" / "perturbation_summary.json")
    spec = _read(out / "class_specificity" / "class_specificity_summary.json")
    log = _read(args.model / "training_log.json") or {}
    model_info = {"folder": os.path.relpath(args.model.resolve(), REPO),
                  "final_test_acc": log.get("final_test_acc"),
                  "clean_accuracy_on_benchmark_canvases": pred["results"][args.methods[0]]["positive"]["accuracy"][0]
                  if pred else None}
    results = {
        "model": model_info, "settings": identity, "timing": timing,
        "segmentation": seg and seg["results"],
        "perturbation_predicted": pred and pred["results"], "perturbation_true": true and true["results"],
        "class_specificity": spec and spec["results"],
        "pairs_with_both_classes_in_top2": spec and spec["pairs_with_both_classes_in_top2"],
        "samples": {"canvases": seg and seg["samples"], "pairs": spec and spec["samples"]},
        "failed": {name: s["failed"] for name, s in (("segmentation", seg), ("perturbation_predicted", pred),
                                                      ("perturbation_true", true), ("class_specificity", spec))
                   if s and s["failed"]},
        "paper_imagenet": {"source": PAPER_SOURCE, "values": PAPER_IMAGENET},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpu_threads": args.threads},
    }
    comparisons = paired_comparisons(out, list(args.methods), args.bootstrap)
    results["comparisons"] = comparisons
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if seg:
        plot_segmentation(seg, out / "segmentation.png")

    md = [f"Model: `{model_info['folder']}` (test accuracy {_fmt(model_info['final_test_acc'])}% on 10,000 "
          f"test canvases; clean accuracy on the benchmark canvases "
          f"{_fmt(model_info['clean_accuracy_on_benchmark_canvases'])}%). "
          f"transformer_attribution and rollout with start_layer={args.start_layer}. Best value per column in bold.",
          ""]
    if seg:
        md += [f"**Segmentation** ({seg['samples']} test canvases; %, higher is better)", "", segmentation_table(seg), ""]
    if pred and true:
        md += [f"**Perturbation** ({pred['samples']} test canvases; AUC of top-1 accuracy over 0-90% removed "
               f"pixels, x100)", "", perturbation_table(pred, true), ""]
    if spec:
        md += [f"**Class specificity** ({spec['samples']} two-item test canvases, each class explained; the model "
               f"ranks both classes top 2 on {_fmt(spec['pairs_with_both_classes_in_top2'], digits=1)}% of pairs)",
               "", class_specificity_table(spec), ""]
    if comparisons["metrics"]:
        md += [f"**{REFERENCE} minus each other method** (percentage points, 95% paired bootstrap interval over "
               f"the same images, {comparisons['resamples']} resamples; for positive AUC lower is better, so a "
               f"negative difference favours {REFERENCE})", "", comparison_table(comparisons), ""]
    total = sum(t["wall_s"] for t in timing.values())
    md += ["Wall time (s, " + f"{args.threads} CPU threads): "
           + ", ".join(f"{k} {v['wall_s']}" for k, v in timing.items()) + f"; total {total:.0f}", ""]
    md += [f"ImageNet (paper) columns: {PAPER_SOURCE}; n/a = not reported there. A different model and "
           "dataset: for orientation, not for direct comparison.", ""]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    from relprop.errors import RelpropError

    try:
        sys.exit(main())
    except RelpropError as error:  # e.g. results in --out from another model: one line, not a traceback
        print(f"vision_fashion.py: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
