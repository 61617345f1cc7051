"""Throughput of ``relprop eval perturbation`` with 1 and 2 processes (``--launcher torchrun``) on
this machine, for the bundled ``fmnist_vit`` and a ViT-B/16-shaped random model, and the per-image
forward cost of that ViT-B/16 (what the perturbation test repeats 18 times per image and method).

Each setting runs twice, on ``--small`` and on ``--large`` canvases of the Fashion-MNIST test split
(the ViT-B gets them resized to 224x224); images/s is (large - small) / (time(large) - time(small)),
which leaves out process start-up, model loading and the summary, and the wall times are kept too.
The processes split the machine's cores (OMP_NUM_THREADS = cores / processes).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/eval_throughput.py [--models fmnist vit_b16] [--method NAME]

writes ``benchmarks/results/eval_throughput.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "eval_throughput.json"
SIZES = {"fmnist": (16, 64), "vit_b16": (2, 6)}


def vit_b16(folder: Path) -> Path:
    """A ViT-B/16-shaped model (random weights; 10 classes for the canvases) saved in ``folder``."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, num_labels=10)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return folder


@torch.no_grad()
def forward_cost(model_dir: Path, threads: int, batch: int = 8, repeats: int = 3) -> float:
    """Median seconds per image of a batched forward pass."""
    from transformers import ViTForImageClassification

    torch.set_num_threads(threads)
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    x = torch.randn(batch, 3, 224, 224)
    model(pixel_values=x)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(pixel_values=x)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / batch


def timed_run(model_dir: Path, data: str, n: int, processes: int, method: str, out: Path) -> float:
    """Wall seconds of one ``relprop eval perturbation`` run over the first ``n`` canvases."""
    command = [sys.executable, "-m", "relprop", "eval", "perturbation", "--format", "fashion", "--data", data,
               "--model", str(model_dir), "--limit", str(n), "--methods", method, "--out", str(out),
               "--no-progress", "--device", "cpu"]
    if processes > 1:
        command += ["--launcher", "torchrun", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)),
           "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="transformer_attribution")
    parser.add_argument("--data", default=os.environ.get("RELPROP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import relprop

    results: dict = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "method": args.method,
                     "load_average_before": list(os.getloadavg()), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"fmnist": Path(relprop.__file__).parent / "assets" / "fmnist_vit"}
        if "vit_b16" in args.models:
            folders["vit_b16"] = vit_b16(Path(tmp) / "vit_b16")
            results["vit_b16_forward_s_per_image"] = {
                str(p): forward_cost(folders["vit_b16"], max(1, (os.cpu_count() or 1) // p)) for p in (1,)}
        for name in args.models:
            small, large = SIZES[name]
            for processes in args.processes:
                walls = {n: timed_run(folders[name], args.data, n, processes, args.method,
                                      Path(tmp) / f"{name}-{processes}-{n}") for n in (small, large)}
                rate = (large - small) / (walls[large] - walls[small])
                row = {"model": name, "processes": processes, "threads_per_process":
                       max(1, (os.cpu_count() or 1) // processes), "images": [small, large],
                       "wall_s": [round(walls[small], 2), round(walls[large], 2)], "images_per_s": round(rate, 3)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    results["load_average_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
