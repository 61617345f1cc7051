"""Speed and memory of every method on ViT-B/16, as ratios to a plain forward + backward.

Builds ``ViTForImageClassification`` from the ``vit-base-patch16-224`` configuration with
random weights (float32, the model's default SDPA attention), then, in one run and
interleaved, times a forward + backward of the target logit (the baseline: what a user's
own gradient computation costs) and each method, at batch 1 and 8. Peak memory is measured
per configuration in a fresh subprocess (peak resident set size above the loaded model); on a
GPU (``--device cuda``) as the peak of allocated device memory above the loaded model, in process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_vit.py --repeats 5 --out benchmarks/results/vit_b16.json
    python benchmarks/bench_vit.py --device cuda --batches 1 8 32 --out benchmarks/results/vit_b16_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

METHODS = ["transformer_attribution", "rollout", "raw_attention", "attn_gradcam", "partial_lrp", "lrp", "grad_rollout"]


def build_model():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, num_labels=1000, layer_norm_eps=1e-12)
    return ViTForImageClassification(config).eval()


def make_runner(model, name, batch):
    import relprop

    device = next(model.parameters()).device
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    target = (torch.arange(batch) % 1000).to(device)
    if name == "forward+backward":
        def run():
            model.zero_grad(set_to_none=True)
            model(pixel_values=x).logits.gather(1, target[:, None]).sum().backward()
    else:
        explainer = relprop.Explainer(model)

        def run():
            explainer.explain(x, name, target=target)
    if device.type != "cuda":
        return run

    def run_synchronized():      # GPU work is asynchronous: time it to completion
        run()
        torch.cuda.synchronize(device)
    return run_synchronized


def measure_cuda_memory(model, name: str, batch: int) -> int:
    """Peak allocated device memory of one call above what was allocated before it (the model)."""
    run = make_runner(model, name, batch)
    run()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated() - before


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_memory_child(name: str, batch: int) -> None:
    model = build_model()
    run = make_runner(model, name, batch)
    before = _rss("VmRSS:")
    run()
    run()
    print(json.dumps({"peak_bytes": _rss("VmHWM:") - before}))


def measure_memory(name: str, batch: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, str(batch)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    model = build_model().to(args.device)
    names = ["forward+backward"] + args.methods
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device, "rows": []}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
        memory = lambda name, batch: measure_cuda_memory(model, name, batch)  # noqa: E731
    else:
        memory = measure_memory
    for batch in args.batches:
        runners = {name: make_runner(model, name, batch) for name in names}
        for run in runners.values():       # warm-up
            run()
        times = {name: [] for name in names}
        for _ in range(args.repeats):      # interleaved, so machine noise hits every entry alike
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        base_time = statistics.median(times["forward+backward"])
        base_mem = None if args.no_memory else memory("forward+backward", batch)
        for name in names:
            median = statistics.median(times[name])
            row = {"batch": batch, "method": name, "median_s": median, "per_image_s": median / batch,
                   "time_ratio": median / base_time}
            if base_mem is not None:
                mem = base_mem if name == "forward+backward" else memory(name, batch)
                row.update(peak_mib=mem / 2**20, memory_ratio=mem / base_mem)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    print(markdown_table(results["rows"]))


def markdown_table(rows) -> str:
    lines = ["| batch | method | median s | s / image | time ÷ fwd+bwd | peak MiB | memory ÷ fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['method']} | {r['median_s']:.3f} | {r['per_image_s']:.3f} | "
                     f"{r['time_ratio']:.2f} | {r.get('peak_mib', float('nan')):.0f} | {r.get('memory_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
