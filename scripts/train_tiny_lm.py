"""Train relprop's bundled causal language model: a tiny Llama on movie-review text.

Data (real text, read from ``../shared/data`` or --data; never copied into the repository):
the Pang & Lee polarity v2.0 reviews ``cv000``-``cv899`` (1,800 full reviews) and the SST-2
``train.tsv`` + ``dev.tsv`` phrases. Held out, never trained on: the reviews ``cv900``-``cv999``
(200) and SST-2 ``test.tsv`` (872 full sentences, GLUE's dev set), on which the perplexity is
measured with the shipped (float16-stored) weights after reloading them through
``relprop.text.pretrained.load_tiny_lm``.

A byte-level BPE tokenizer is trained on the training text with the ``tokenizers`` library
(special tokens ``<unk> <pad> <bos> <eos>``; every text starts with ``<bos>``); each document
becomes ``<bos> text <eos>``, the documents are concatenated and cut into blocks.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=src python scripts/train_tiny_lm.py

writes ``src/relprop/assets/tiny_lm/`` (config, float16 weights, tokenizer, ``training_log.json``).
The bundled model came from this command with the defaults (3 layers, hidden 128, 1,200 steps of
16 x 128 tokens = 0.74 epochs): 9.2 minutes of training on two CPU threads of a busy 2-core
machine, held-out perplexity 68.8 on SST-2 test and 80.3 on the held-out reviews.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from relprop.text.corpus import read_polarity_reviews, read_sst2
from relprop.text.pretrained import TINY_LM_DIR, TINY_LM_SAMPLE_PROMPTS, greedy_continuation, load_tiny_lm
from relprop.text.rationales import default_data_dir

SPECIAL_TOKENS = ["<unk>", "<pad>", "<bos>", "<eos>"]
TRAIN_REVIEWS, HELD_OUT_REVIEWS = range(0, 900), range(900, 1000)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder with movies/ and sst2/ (default ../shared/data)")
    p.add_argument("--out", type=Path, default=TINY_LM_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="key-value heads (grouped-query attention as in Llama)")
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """``<bos> text <eos>`` per text."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]


def blocks_of(documents: list[list[int]], block_size: int) -> torch.Tensor:
    """The documents concatenated and cut into [N, block_size] (the tail shorter than a block dropped)."""
    stream = np.fromiter((i for doc in documents for i in doc), dtype=np.int64)
    count = len(stream) // block_size
    return torch.from_numpy(stream[:count * block_size].reshape(count, block_size))


@torch.no_grad()
def perplexity(model, documents: list[list[int]], block_size: int, batch_size: int = 32) -> float:
    """exp(mean next-token loss) over every document on its own (first block_size tokens each is
    not enough for reviews: each document is split into consecutive chunks of block_size)."""
    chunks = [doc[i:i + block_size] for doc in documents for i in range(0, len(doc) - 1, block_size - 1)]
    chunks = [c for c in chunks if len(c) > 1]
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        width = max(len(c) for c in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, chunk in enumerate(batch):
            ids[row, :len(chunk)], mask[row, :len(chunk)] = torch.tensor(chunk), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        total += float(losses[keep].sum())
        count += int(keep.sum())
    return math.exp(total / count)


def learning_rate(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data = args.data or default_data_dir()
    started = time.time()

    reviews = read_polarity_reviews(data / "movies" / "pang_lee_polarity_v2.zip", TRAIN_REVIEWS)
    held_reviews = read_polarity_reviews(data / "movies" / "pang_lee_polarity_v2.zip", HELD_OUT_REVIEWS)
    sst_train = read_sst2(data / "sst2" / "train.tsv")[0] + read_sst2(data / "sst2" / "dev.tsv")[0]
    sst_test = read_sst2(data / "sst2" / "test.tsv")[0]
    train_texts = [text for _, text in reviews] + sst_train
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_blocks = blocks_of(encode_documents(tokenizer, train_texts), args.block_size)
    held = {"sst2_test": encode_documents(tokenizer, sst_test),
            "reviews_cv900_999": encode_documents(tokenizer, [text for _, text in held_reviews])}
    print(f"tokenizer {len(tokenizer)} tokens; {train_blocks.numel():,} training tokens in {len(train_blocks)} "
          f"blocks; {time.time() - started:.0f} s", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    order: list[int] = []
    curve = []
    train_started = time.time()
    running = None
    for step in range(args.steps):
        if len(order) < args.batch_size:
            fresh = list(range(len(train_blocks)))
            rng.shuffle(fresh)
            order += fresh
        batch = train_blocks[order[:args.batch_size]]
        del order[:args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            ppl = perplexity(model, held["sst2_test"], args.block_size)
            model.train()
            curve.append({"step": step + 1, "train_loss_ema": round(running, 4), "sst2_test_perplexity": round(ppl, 2),
                          "seconds": round(time.time() - train_started, 1)})
            print(json.dumps(curve[-1]), flush=True)
    train_seconds = time.time() - train_started

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.float16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # Measure what is shipped: the float16 weights, reloaded as a user would.
    shipped, shipped_tokenizer = load_tiny_lm(args.out)
    held_ppl = {name: round(perplexity(shipped, docs, args.block_size), 2) for name, docs in held.items()}
    samples = {prompt: greedy_continuation(shipped, shipped_tokenizer, prompt) for prompt in TINY_LM_SAMPLE_PROMPTS}
    log = {
        "command": "python " + shlex.join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"train": "pang_lee_polarity_v2.zip reviews cv000-cv899 (pos+neg, 1800) + sst2 train.tsv + dev.tsv",
                 "held_out": "sst2 test.tsv (872 sentences) + pang_lee_polarity_v2.zip reviews cv900-cv999 (200)",
                 "training_tokens": int(train_blocks.numel()), "epochs": round(args.steps * args.batch_size
                                                                              / len(train_blocks), 2)},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "held_out_perplexity": held_ppl,
        "curve": curve,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "greedy_samples": samples,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version()},
        "threads": args.threads,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({"held_out_perplexity": held_ppl, "samples": samples, "train_seconds": log["train_seconds"]},
                     indent=2))


if __name__ == "__main__":
    main()
