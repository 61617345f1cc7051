"""Train relprop's bundled default model: a small ViT on cluttered Fashion-MNIST canvases.

Each epoch draws fresh canvases of all train items (new positions, scales and clutter via
a per-epoch canvas seed), so the canvas generator doubles as data augmentation. The test
metric is top-1 accuracy on the canonical benchmark canvases: split "test", seed 0.

Two choices make a from-scratch ViT learn fast enough on a CPU budget, and neither changes the
architecture (the result is a plain `ViTForImageClassification`): a fixed 2-D sine-cosine
position table, and mimetic attention initialisation (query-key products start near +I,
value-output products near -I), which gives attention a local, convolution-like start.

    OMP_WAIT_POLICY=PASSIVE python scripts/train_fmnist_vit.py

needs `apt-get install dataset-fashion-mnist` (or --data-root); about 47 minutes on two CPU
threads (--threads) for 86.4% test accuracy; --epochs 9 gave 85.3% in 42 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

from relprop.registry import find_layer_list, get_path
from relprop.datasets import CLASS_NAMES, CanvasConfig, load_split, make_canvas

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "relprop" / "assets" / "fmnist_vit"
TEST_CANVAS_SEED = 0  # the benchmark's canonical test canvases


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST idx.gz files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=11)
    p.add_argument("--train-per-epoch", type=int, default=60000, help="train items drawn per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--position-embedding", choices=("learned", "sincos"), default="sincos",
                   help="sincos: fixed 2-D sine-cosine table, not trained (saved as ordinary weights)")
    p.add_argument("--attention-init", choices=("random", "mimetic"), default="mimetic",
                   help="mimetic: query-key products start near +identity and value-output products near "
                        "-identity (Trockman & Kolter, ICML 2023); only the starting weights change")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--epoch-eval-size", type=int, default=2000, help="test canvases scored per epoch")
    p.add_argument("--eval-size", type=int, default=10000, help="train and test canvases scored at the end")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def model_config(args: argparse.Namespace, canvas: CanvasConfig) -> ViTConfig:
    return ViTConfig(
        image_size=canvas.size, patch_size=args.patch_size, num_channels=3,
        hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate_size,
        hidden_act="gelu", layer_norm_eps=1e-6,
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
    )


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float, (u8/255 - 0.5)/0.5 like the saved processor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def canvas_batch(split: str, indices: np.ndarray, seed: int, canvas: CanvasConfig,
                 root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    items = [make_canvas(split, int(i), seed, canvas, root) for i in indices]
    images = np.stack([image for image, _, _ in items])
    labels = torch.tensor([label for _, _, label in items])
    return to_pixel_values(images), labels


@torch.no_grad()
def evaluate(model: ViTForImageClassification, n: int, canvas: CanvasConfig, root: str | None,
             split: str = "test", batch_size: int = 250) -> float:
    """Top-1 accuracy on the first ``n`` canvases of ``split`` drawn with the benchmark seed."""
    model.eval()
    correct = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        x, y = canvas_batch(split, idx, TEST_CANVAS_SEED, canvas, root)
        correct += (model(pixel_values=x).logits.argmax(-1) == y).sum().item()
    model.train()
    return correct / n


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero: the usual recipe for ViTs trained from scratch."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sine-cosine position table (MAE / "Better plain ViT baselines")."""
    if dim % 4:
        raise ValueError("hidden size must be a multiple of 4 for 2-D sine-cosine embeddings")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                            torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def use_sincos_positions(model: ViTForImageClassification) -> None:
    """Fixed 2-D sine-cosine positions give translation structure from step one; the table
    stays an ordinary (frozen during training) parameter, so the saved model is a plain ViT."""
    table = model.vit.embeddings.position_embeddings
    grid = model.config.image_size // model.config.patch_size
    with torch.no_grad():
        table.zero_()  # [CLS] slot: no position
        table[0, 1:] = sincos_2d(grid, model.config.hidden_size)
    table.requires_grad_(False)


def identity_plus_noise(dim: int, noise: float, identity: float, generator: torch.Generator) -> torch.Tensor:
    """noise * Z + identity * I with Z ~ N(0, 1/dim): the target of a mimetic weight product."""
    z = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    return noise * z + identity * torch.eye(dim, dtype=torch.float64)


def factor_pair(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R), both dim x rank, with L @ R.T the best rank-``rank`` approximation of ``target``."""
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def attention_projections(layer: torch.nn.Module) -> tuple[torch.nn.Linear, ...]:
    """A ViT block's query, key, value and output projections (transformers 5.x or 4.x names)."""
    return tuple(get_path(layer, f"attention.{new}", f"attention.{old}") for new, old in (
        ("q_proj", "attention.query"), ("k_proj", "attention.key"),
        ("v_proj", "attention.value"), ("o_proj", "output.dense")))


def use_mimetic_attention_init(model: ViTForImageClassification, seed: int,
                               qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Start each head's W_q W_k^T near +I (tokens attend to similar tokens, and with sin-cos
    positions to nearby patches) and each block's W_v W_o near -I, the structure trained ViTs
    show; gives a from-scratch ViT a convolution-like start without changing the architecture."""
    gen = torch.Generator().manual_seed(seed)
    dim, heads = model.config.hidden_size, model.config.num_attention_heads
    head_dim = dim // heads
    with torch.no_grad():
        for layer in find_layer_list(model.vit):
            query, key, value, out = attention_projections(layer)
            for h in range(heads):
                w_q, w_k = factor_pair(identity_plus_noise(dim, *qk, gen), head_dim)
                rows = slice(h * head_dim, (h + 1) * head_dim)
                # nn.Linear computes x @ weight.T, so weight rows are the factor's columns.
                query.weight[rows] = w_q.T.float()
                key.weight[rows] = w_k.T.float()
            w_v, w_o = factor_pair(identity_plus_noise(dim, vo[0], -vo[1], gen), dim)
            value.weight.copy_(w_v.T.float())
            out.weight.copy_(w_o.float())


def train(args: argparse.Namespace, model: ViTForImageClassification, canvas: CanvasConfig) -> list[dict]:
    n_train = len(load_split("train", args.data_root)[1])
    steps_per_epoch = math.ceil(min(args.train_per_epoch, n_train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup_steps, total_steps))
    order_rng = np.random.default_rng(args.seed)
    history, step, t0 = [], 0, time.time()
    for epoch in range(args.epochs):
        # Distinct canvas seeds per epoch = fresh augmentations; offset keeps them off seed 0's.
        epoch_seed = 1000 * (args.seed + 1) + epoch
        order = order_rng.permutation(n_train)[: args.train_per_epoch]
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            x, y = canvas_batch("train", order[b * args.batch_size:(b + 1) * args.batch_size],
                                epoch_seed, canvas, args.data_root)
            logits = model(pixel_values=x).logits
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {step}/{total_steps} loss {loss_sum / seen:.4f} "
                      f"train_acc {correct / seen:.4f} lr {sched.get_last_lr()[0]:.2e} "
                      f"{time.time() - t0:.0f}s", flush=True)
        test_acc = evaluate(model, args.epoch_eval_size, canvas, args.data_root)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc_running": correct / seen,
                        f"test_acc_first_{args.epoch_eval_size}": test_acc,
                        "elapsed_s": round(time.time() - t0, 1)})
        print(f"== epoch {epoch + 1}: {json.dumps(history[-1])}", flush=True)
    return history


def save(model: ViTForImageClassification, out: Path, canvas: CanvasConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # written via a private temp file (0600)
    # The PIL backend avoids a torchvision dependency and saves as plain "ViTImageProcessor".
    processor_cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    processor_cls(
        do_resize=True, size={"height": canvas.size, "width": canvas.size}, resample=2,  # bilinear
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out)


def check_reload(model: ViTForImageClassification, out: Path, canvas: CanvasConfig, root: str | None) -> None:
    """The saved folder must reproduce the trained model's logits through the saved processor."""
    reloaded = ViTForImageClassification.from_pretrained(out).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    images = [make_canvas("test", i, TEST_CANVAS_SEED, canvas, root)[0] for i in range(8)]
    with torch.no_grad():
        ours = model.eval()(pixel_values=to_pixel_values(np.stack(images))).logits
        theirs = reloaded(**processor(images=images, return_tensors="pt")).logits
    if not torch.allclose(ours, theirs, atol=1e-4):
        raise RuntimeError(f"reloaded model disagrees: max |diff| {(ours - theirs).abs().max():.2e}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    canvas = CanvasConfig()
    model = ViTForImageClassification(model_config(args, canvas))
    if args.position_embedding == "sincos":
        use_sincos_positions(model)
    if args.attention_init == "mimetic":
        use_mimetic_attention_init(model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ViT with {n_params:,} parameters, attention: {model.config._attn_implementation}", flush=True)

    t0 = time.time()
    history = train(args, model, canvas)
    train_wall = time.time() - t0
    train_acc = evaluate(model, args.eval_size, canvas, args.data_root, split="train")
    test_acc = evaluate(model, args.eval_size, canvas, args.data_root)
    print(f"final accuracy on {args.eval_size} canvases: train {train_acc:.4f}, test {test_acc:.4f} "
          f"(training {train_wall / 60:.1f} min)", flush=True)

    save(model, args.out, canvas)
    check_reload(model, args.out, canvas, args.data_root)
    log = {
        "command": "OMP_WAIT_POLICY=PASSIVE python " + shlex.join(sys.argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_config": {k: getattr(model.config, k) for k in (
            "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps")},
        "num_parameters": n_params,
        "canvas_config": dataclasses.asdict(canvas),
        "eval_canvases": {"splits": ["train", "test"], "seed": TEST_CANVAS_SEED, "count": args.eval_size},
        "normalisation": "x = (u8 / 255 - 0.5) / 0.5",
        "train_wall_time_s": round(train_wall, 1),
        "total_wall_time_s": round(time.time() - t0, 1),
        "final_train_acc": train_acc,
        "final_test_acc": test_acc,
        "history": history,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__},
        "threads": torch.get_num_threads(),
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
