"""Record the per-sample records of every benchmark runner on a tiny real set, as a reference
that the runners must keep reproducing exactly (``tests/eval/test_reference_records.py``).

Vision: the first 4 single-item and 3 two-item Fashion-MNIST test canvases with the bundled
``fmnist_vit`` (perturbation, segmentation, class specificity; transformer_attribution with
``start_layer=1``, rollout, lrp). Text: the first 3 Zaidan test reviews with the bundled MiniLM
(rationale token-F1: per-document word scores and P/R/F1 per k). Explanations in float64 and one
thread: a float32 map (LRP's most of all) changes with the CPU's summation order enough to move a
perturbation step or a segmentation pixel, so a float32 reference holds on the machine that made it
only. It uses the runners of before the refactor, so it runs at that commit:

    git worktree add /tmp/before d80676b && cp scripts/record_eval_reference.py /tmp/before/scripts/
    cd /tmp/before && OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python scripts/record_eval_reference.py \
        --out OUT_PATH

Records keep only what a benchmark computes: the run-dependent fields (``cfg``: the settings
id; ``src``: the data files' size and mtime) are dropped.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "eval" / "data" / "reference_records.json"
VISION_METHODS = ("transformer_attribution", "rollout", "lrp")
TEXT_METHODS = ("transformer_attribution", "lrp", "attn_gradcam")
N_CANVASES, N_PAIRS, N_REVIEWS = 4, 3, 3
RUN_FIELDS = ("cfg", "src")


def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without their run-dependent fields, in a canonical order."""
    kept = [{k: v for k, v in r.items() if k not in RUN_FIELDS} for r in records]
    return sorted(kept, key=lambda r: json.dumps([r["method"], r.get("mode", ""), r["id"]]))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def vision_records(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Records of the three vision runners as they were before the runner refactor."""
    import relprop
    from relprop.eval import fashion, loading
    from relprop.eval.class_specificity import ClassSpecificityConfig, run_class_specificity
    from relprop.eval.perturbation import PerturbationConfig, run_perturbation
    from relprop.eval.segmentation import SegmentationConfig, run_segmentation

    folder = Path(relprop.__file__).parent / "assets" / "fmnist_vit"
    model = loading.load_model(str(folder))
    preprocessor = loading.read_preprocessor_config(str(folder))
    size, norm = loading.image_size(model, preprocessor), loading.normalization(preprocessor)
    explainer = fashion.MethodOptions(relprop.Explainer(model, dtype=torch.float64), {"transformer_attribution": {"start_layer": 1}})
    methods = list(VISION_METHODS)
    run_perturbation(model, explainer, fashion.canvas_images(N_CANVASES), methods, out / "perturbation",
                     PerturbationConfig(image_size=size, normalization=norm), batch_size=3, progress=False)
    run_segmentation(model, explainer, fashion.canvas_segmentation(N_CANVASES), methods, out / "segmentation",
                     SegmentationConfig(size, norm), batch_size=3, progress=False)
    run_class_specificity(model, explainer, fashion.pair_samples(N_PAIRS), methods, out / "class_specificity",
                          ClassSpecificityConfig(size, norm), batch_size=2, progress=False)
    return {name: strip(read_jsonl(out / name / f"{name}.jsonl"))
            for name in ("perturbation", "segmentation", "class_specificity")}


def rationale_records(out: Path) -> list[dict[str, Any]]:
    """Per review and method: word scores (max over word pieces, NaN as None) and P/R/F1 per k
    under the authors' protocol (clip at 0, k = 5..80, ties to the earlier word)."""
    import numpy as np

    import relprop
    from relprop.eval.token_f1 import DEFAULT_KS, document_prf, encode_words, rationale_masks, word_relevance
    from relprop.text.pretrained import load_sentiment_model
    from relprop.text.rationales import convert_zaidan, default_data_dir, load_eraser

    convert_zaidan(out / "eraser", archive=default_data_dir() / "movies" / "zaidan_rationales.tar.gz")
    examples = list(load_eraser(out / "eraser", "test"))[:N_REVIEWS]
    model, tokenizer = load_sentiment_model()
    explainer = relprop.Explainer(model, dtype=torch.float64)
    records = []
    for example in examples:  # one review a pass: padding never enters the reference
        encoding = encode_words(tokenizer, example.tokens, max_length=512)
        inputs = {"input_ids": torch.tensor([encoding.input_ids]),
                  "attention_mask": torch.ones(1, len(encoding.input_ids), dtype=torch.long)}
        target = {"NEG": 0, "POS": 1}[example.label]
        for method in TEXT_METHODS:
            pieces = explainer.explain(inputs, method, target=[target]).relevance[0].float().numpy()
            words = word_relevance(pieces, encoding.word_ids, n_words=len(example.tokens))
            masks = rationale_masks(words, DEFAULT_KS)
            records.append({
                "method": method, "id": example.docid, "label": target,
                "words": [None if np.isnan(w) else float(w) for w in words],
                "prf": {str(k): list(document_prf(masks[k], example.rationale)) for k in DEFAULT_KS},
            })
    return strip(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        reference = {**vision_records(Path(tmp)), "rationale": rationale_records(Path(tmp))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reference, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)} records" for k, v in reference.items()))


if __name__ == "__main__":
    main()
