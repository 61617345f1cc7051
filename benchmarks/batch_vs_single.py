"""Worst difference between a sample's map in a batch and its map explained alone.

For every method, on the golden ViT (its 4 test images in one batch, each of the 10 classes as
target) and the golden BERT (batches of 4 random texts of lengths 24, 9, 17, 5, padded to 24,
against each text unpadded; ``--text-batches`` seeds), in float32 and float64. The measure is
the tests' one: max |batch - single| / max |single| per sample, worst over all samples.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/batch_vs_single.py --out benchmarks/results/batch_vs_single.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"


def load(fixture: str, cls):
    folder = Path(tempfile.mkdtemp())
    shutil.copy(GOLDEN / f"{fixture}.hf_config.json", folder / "config.json")
    shutil.copy(GOLDEN / f"{fixture}.hf.safetensors", folder / "model.safetensors")
    model = cls.from_pretrained(folder).eval()
    shutil.rmtree(folder)
    return model


def vit_cases():
    from safetensors.torch import load_file

    images = load_file(str(GOLDEN / "vit_small.inputs.safetensors"))["images_u8"]
    x = (images.float() / 255 - 0.5) / 0.5
    for target in range(10):
        yield x, torch.full((4,), target), [(x[i:i + 1], None) for i in range(4)]


def text_cases(batches: int):
    sys.path.insert(0, str(ROOT))
    from tests.test_explainer import _mixed_length_bert_batch     # the tests' batches

    for seed in range(batches):
        ids, mask, lengths = _mixed_length_bert_batch(seed)
        targets = torch.tensor([0, 1, 1, 0])
        yield ({"input_ids": ids, "attention_mask": mask}, targets,
               [({"input_ids": ids[i:i + 1, :n]}, n) for i, n in enumerate(lengths)])


def worst(explainer, method, cases) -> float:
    result = 0.0
    for batch_inputs, targets, singles in cases:
        batch = explainer.explain(batch_inputs, method, target=targets).relevance.double()
        for i, (inputs, length) in enumerate(singles):
            single = explainer.explain(inputs, method, target=int(targets[i])).relevance.double()[0]
            ours = batch[i] if length is None else batch[i, :length]
            scale = single.abs().max().item()
            result = max(result, (ours - single).abs().max().item() / scale if scale else 0.0)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-batches", type=int, default=60)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    from transformers import BertForSequenceClassification, ViTForImageClassification

    import relprop

    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = {"vit": (load("vit_small", ViTForImageClassification), lambda: vit_cases()),
              "bert": (load("bert_small", BertForSequenceClassification), lambda: text_cases(args.text_batches))}
    rows = []
    for method in relprop.methods():
        row = {"method": method}
        for name, (model, cases) in models.items():
            for dtype in (torch.float32, torch.float64):
                row[f"{name}_{str(dtype)[6:]}"] = worst(relprop.Explainer(model, dtype=dtype), method, cases())
        rows.append(row)
        print(" | ".join([method] + [f"{v:.1e}" for k, v in row.items() if k != "method"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"measure": "max |batch - single| / max |single|, worst sample",
                                             "vit_samples": 40, "bert_samples": 4 * args.text_batches,
                                             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
