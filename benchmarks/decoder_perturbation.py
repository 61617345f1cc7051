"""AttnLRP's input-perturbation test on a causal language model, for every relprop method.

For each held-out prompt the explained target is the model's greedy next token at the last
position (its logit). Each method ranks the prompt's tokens (``<bos>`` excluded: it is never
removed); the tokens are then removed in steps of 10 % of the prompt, most relevant first (MoRF)
and least relevant first (LeRF), and the target's logit is tracked. A removed token is
**replaced** by ``<unk>`` (a fixed id; positions and length stay the same, so the target stays at
the same last position) rather than deleted. The score is the area between the two curves
(LeRF − MoRF, trapezoid over the removed fraction 0 … 1): a faithful ranking drops the logit
fast when the most relevant tokens go and keeps it while the least relevant go, so larger is
better; a random ranking scores about 0. The same area on the target's softmax probability is
reported beside it. Ranking: by the signed relevance (signed methods' negative tokens are the
"least relevant"), ties broken by a fixed random order per prompt.

Prompts (never trained on by the bundled model): SST-2 ``test.tsv`` sentences cut at a random
point inside the sentence (so the next token is a word, not the end of the sentence) and
windows at random offsets of the held-out reviews ``cv900``-``cv999``, each 12 to
``--max-tokens`` tokens including ``<bos>``.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/decoder_perturbation.py

writes ``benchmarks/results/decoder_perturbation/{results.json,results.md,curves.png}``.
``--model DIR`` explains another causal LM folder (default: the bundled tiny Llama,
``relprop.text.pretrained.load_tiny_lm``).
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import relprop
from relprop.files import atomic_write, atomic_write_text, output_dir
from relprop.text.corpus import read_polarity_reviews, read_sst2
from relprop.text.rationales import default_data_dir

OUT = Path(__file__).parent / "results" / "decoder_perturbation"
FRACTIONS = np.round(np.linspace(0.0, 1.0, 11), 10)
RANDOM = "random"
# A second baseline with no model in it: the latest token first. A next-token logit leans on the
# last few tokens, so this says how much of an area recency alone earns.
RECENCY = "recency"
BASELINES = (RANDOM, RECENCY)
MIN_TOKENS = 12
HELD_OUT_REVIEWS = range(900, 1000)

Scorer = Callable[[torch.Tensor], torch.Tensor]  # [N, T] token ids -> [N, 2] (target logit, target probability)


def removal_order(relevance: np.ndarray, removable: np.ndarray, tie_key: np.ndarray) -> np.ndarray:
    """Positions in ``removable`` (bool [T]) from most to least relevant; ties go by ``tie_key``
    (lower first). Non-finite relevance is refused (it would rank arbitrarily)."""
    positions = np.flatnonzero(removable)
    values = np.asarray(relevance, dtype=np.float64)[positions]
    if not np.all(np.isfinite(values)):
        raise ValueError("relevance has non-finite values at removable positions")
    return positions[np.lexsort((tie_key[positions], -values))]


def perturbed_sequences(ids: torch.Tensor, order: np.ndarray, replacement_id: int,
                        fractions: Sequence[float] = FRACTIONS) -> torch.Tensor:
    """[2, F, T]: ``ids`` with the first round(f · n) positions of ``order`` replaced (MoRF, row 0)
    and the last ones (LeRF, row 1), for each fraction f of the n removable positions."""
    n = len(order)
    out = ids.repeat(2, len(fractions), 1)
    for step, fraction in enumerate(fractions):
        k = int(round(fraction * n))
        out[0, step, order[:k]] = replacement_id
        out[1, step, order[n - k:]] = replacement_id
    return out


def curves(score: Scorer, ids: torch.Tensor, orders: dict[str, np.ndarray], replacement_id: int,
           fractions: Sequence[float] = FRACTIONS) -> dict[str, np.ndarray]:
    """Per ranking: [2 (MoRF, LeRF), F, 2 (logit, probability)] of the target along the removal."""
    names = list(orders)
    batch = torch.cat([perturbed_sequences(ids, orders[name], replacement_id, fractions).flatten(0, 1)
                       for name in names])
    scores = score(batch).double().cpu().numpy().reshape(len(names), 2, len(fractions), 2)
    return dict(zip(names, scores))


def area_between(morf: np.ndarray, lerf: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> float:
    """Area between the LeRF and MoRF curves over the removed fraction (trapezoid rule):
    positive when removing the most relevant tokens hurts the target more."""
    gap = np.asarray(lerf, dtype=np.float64) - np.asarray(morf, dtype=np.float64)
    x = np.asarray(fractions, dtype=np.float64)
    return float(np.sum((gap[1:] + gap[:-1]) * np.diff(x)) / 2)


def target_scorer(model: torch.nn.Module, target: int, batch_size: int = 256) -> Scorer:
    """Scores of ``target`` at the last position of unpadded, equal-length sequences."""
    def score(ids: torch.Tensor) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                # logits_to_keep=1: only the last position goes through the output layer
                logits = model(input_ids=ids[start:start + batch_size], logits_to_keep=1).logits[:, -1].double()
                rows.append(torch.stack([logits[:, target], logits.softmax(-1)[:, target]], dim=1))
        return torch.cat(rows)
    return score


def select_prompts(tokenizer, data: Path, count: int, max_tokens: int, seed: int) -> list[dict]:
    """Half SST-2 test sentences cut inside the sentence, half held-out review windows."""
    rng = np.random.default_rng(seed)
    prompts = []
    sentences = read_sst2(data / "sst2" / "test.tsv")[0]
    for index in rng.permutation(len(sentences)):
        ids = tokenizer(sentences[index])["input_ids"]
        if len(ids) < MIN_TOKENS + 2:
            continue
        cut = int(rng.integers(MIN_TOKENS, min(len(ids) - 1, max_tokens) + 1))  # at least one token left
        prompts.append({"source": f"sst2/test.tsv:{index + 2}", "ids": ids[:cut]})
        if len(prompts) == count // 2:
            break
    reviews = read_polarity_reviews(data / "movies" / "pang_lee_polarity_v2.zip", HELD_OUT_REVIEWS)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for index in rng.permutation(len(reviews))[:count - len(prompts)]:
        name, text = reviews[index]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        length = int(rng.integers(MIN_TOKENS, max_tokens + 1)) - len(bos)
        start = int(rng.integers(0, max(1, len(body) - length - 1)))
        prompts.append({"source": name, "ids": bos + body[start:start + length]})
    return prompts


def explain_prompts(explainer, prompts: list[dict], targets: list[int], methods: Sequence[str],
                    pad_id: int, batch_size: int) -> dict[str, list[np.ndarray]]:
    """Per method, each prompt's per-token relevance for its target (right-padded batches)."""
    relevance: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p["ids"]) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, :len(prompt["ids"])] = torch.tensor(prompt["ids"])
            mask[row, :len(prompt["ids"])] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        for method in methods:
            result = explainer.explain(inputs, method, target=targets[start:start + len(batch)])
            values = result.relevance.detach().double().cpu().numpy()
            relevance[method] += [values[row, :len(p["ids"])] for row, p in enumerate(batch)]
    return relevance


def run(model, tokenizer, prompts: list[dict], methods: Sequence[str], replacement_id: int, seed: int,
        batch_size: int, keep_last: bool = False, log=print) -> dict:
    """Explain every prompt with every method, perturb, and return per-prompt areas and mean curves.
    ``keep_last``: the prompt's last token is never removed (only the tokens before it are ranked)."""
    explainer = relprop.Explainer(model)
    rng = np.random.default_rng(seed + 1)
    targets = []
    for prompt in prompts:
        ids = torch.tensor([prompt["ids"]])
        targets.append(int(explainer.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].argmax()))
    started = time.time()
    relevance = explain_prompts(explainer, prompts, targets, methods, tokenizer.pad_token_id, batch_size)
    explain_seconds = time.time() - started
    log(f"explained {len(prompts)} prompts with {len(methods)} methods in {explain_seconds:.0f} s")
    names = [*methods, *BASELINES]
    areas = {name: {"logit": [], "probability": []} for name in names}
    sums = {name: np.zeros((2, len(FRACTIONS), 2)) for name in names}
    first_token = 1 if tokenizer.bos_token_id is not None else 0
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        ids = torch.tensor(prompt["ids"])
        removable = np.arange(len(ids)) >= first_token
        if keep_last:
            removable[-1] = False
        tie_key = rng.permutation(len(ids))
        orders = {m: removal_order(relevance[m][i], removable, tie_key) for m in methods}
        orders[RANDOM] = removal_order(rng.random(len(ids)), removable, tie_key)
        orders[RECENCY] = removal_order(np.arange(len(ids), dtype=np.float64), removable, tie_key)
        for name, curve in curves(target_scorer(model, target), ids, orders, replacement_id).items():
            sums[name] += curve
            for k, quantity in enumerate(("logit", "probability")):
                areas[name][quantity].append(area_between(curve[0, :, k], curve[1, :, k]))
        if (i + 1) % 50 == 0:
            log(f"perturbed {i + 1}/{len(prompts)} prompts")
    return {"targets": targets, "areas": areas,
            "mean_curves": {name: (total / len(prompts)).tolist() for name, total in sums.items()},
            "explain_seconds": round(explain_seconds, 1), "seconds": round(time.time() - started, 1)}


def summarise(areas: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Mean, standard error and median of the area per method and quantity, best logit area first;
    how often each method beats each baseline ranking on the same prompt; the paired gap to the best."""
    summary = {}
    for name, by_quantity in areas.items():
        row = {}
        for quantity, values in by_quantity.items():
            v = np.asarray(values)
            row[quantity] = {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1
                             else float("nan"), "median": float(np.median(v))}
        if name not in BASELINES:
            for baseline in BASELINES:
                row[f"beats_{baseline}"] = float(np.mean(np.asarray(by_quantity["logit"])
                                                         > np.asarray(areas[baseline]["logit"])))
        summary[name] = row
    ranked = dict(sorted(summary.items(), key=lambda item: -item[1]["logit"]["mean"]))
    best = np.asarray(areas[next(iter(ranked))]["logit"])
    for name, row in ranked.items():
        # paired over the same prompts: is the winner's lead larger than its noise?
        gap = best - np.asarray(areas[name]["logit"])
        row["behind_best"] = {"mean": float(gap.mean()),
                              "sem": float(gap.std(ddof=1) / np.sqrt(len(gap))) if len(gap) > 1 else float("nan")}
    return ranked


def markdown(summary: dict, meta: dict) -> str:
    kept = "; the last prompt token is never removed" if meta.get("keep_last") else ""
    lines = [f"Area between the LeRF and MoRF curves (larger = more faithful), {meta['prompts']} prompts, "
             f"model {meta['model']}; removed tokens replaced by `{meta['replacement']}`{kept}.", "",
             "| rank | method | logit area (mean ± s.e.) | median | behind the best (paired mean ± s.e.) "
             "| probability area | beats random | beats recency |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rank, (name, row) in enumerate(summary.items(), 1):
        beats = " | ".join(f"{100 * row[f'beats_{b}']:.0f} %" if f"beats_{b}" in row else "—" for b in BASELINES)
        lines.append(f"| {rank} | {name} | {row['logit']['mean']:.3f} ± {row['logit']['sem']:.3f} | "
                     f"{row['logit']['median']:.3f} | {row['behind_best']['mean']:.3f} ± {row['behind_best']['sem']:.3f} | "
                     f"{row['probability']['mean']:.4f} | {beats} |")
    return "\n".join(lines) + "\n"


def plot(mean_curves: dict, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    x = 100 * FRACTIONS
    for name in summary:
        curve = np.asarray(mean_curves[name])
        style = {"linewidth": 2.4 if name in ("attnlrp", *BASELINES) else 1.2,
                 "linestyle": ":" if name in BASELINES else "-"}
        line, = axes[0].plot(x, curve[0, :, 0], **style)
        axes[1].plot(x, curve[1, :, 0], color=line.get_color(), label=f"{name} ({summary[name]['logit']['mean']:.2f})",
                     **style)
    for ax, title in zip(axes, ("MoRF: most relevant removed first (lower = better)",
                                "LeRF: least relevant removed first (higher = better)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target logit (mean over prompts)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method (area)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder with movies/ and sst2/ (default ../shared/data)")
    p.add_argument("--model", type=Path, default=None, help="a causal LM folder (default: the bundled tiny Llama)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=48, help="longest prompt, <bos> included")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method of relprop.methods()")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--keep-last", action="store_true",
                   help="never remove the prompt's last token (rank only the context before it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    unknown = set(args.methods or ()) - set(relprop.methods())
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {relprop.methods()}")
    if args.prompts < 2 or args.max_tokens < MIN_TOKENS:
        p.error(f"--prompts must be at least 2 and --max-tokens at least {MIN_TOKENS}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = output_dir(args.out)
    if args.model is None:
        from relprop.text.pretrained import load_tiny_lm
        model, tokenizer = load_tiny_lm()
        model_name = "bundled tiny Llama (relprop.text.pretrained.load_tiny_lm)"
    else:
        from relprop.loading import load_causal_lm
        model, tokenizer = load_causal_lm(str(args.model))
        model_name = str(args.model)
    replacement_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    if replacement_id is None or tokenizer.pad_token_id is None:
        raise SystemExit("the tokenizer has neither an <unk> nor a <pad> token to replace removed tokens with")
    methods = args.methods or relprop.methods()
    prompts = select_prompts(tokenizer, args.data or default_data_dir(), args.prompts, args.max_tokens, args.seed)
    result = run(model, tokenizer, prompts, methods, replacement_id, args.seed, args.batch_size, args.keep_last)
    summary = summarise(result["areas"])
    meta = {"model": model_name, "prompts": len(prompts), "replacement": tokenizer.convert_ids_to_tokens(replacement_id),
            "replacement_id": replacement_id, "fractions": FRACTIONS.tolist(),
            "prompt_tokens": {"min": min(len(p["ids"]) for p in prompts), "max": max(len(p["ids"]) for p in prompts),
                              "mean": round(float(np.mean([len(p["ids"]) for p in prompts])), 1)},
            "sources": {"sst2_test": sum(p["source"].startswith("sst2") for p in prompts),
                        "held_out_reviews": sum(not p["source"].startswith("sst2") for p in prompts)},
            "keep_last": args.keep_last, "seed": args.seed, "threads": args.threads, "explain_seconds": result["explain_seconds"],
            "seconds": result["seconds"], "torch": torch.__version__}
    record = {"meta": meta, "summary": summary, "mean_curves": result["mean_curves"],
              "curve_layout": "[MoRF, LeRF][fraction][logit, probability]",
              "per_prompt": [{"source": p["source"], "length": len(p["ids"]), "target": t,
                              "logit_area": {n: round(result["areas"][n]["logit"][i], 5) for n in summary}}
                             for i, (p, t) in enumerate(zip(prompts, result["targets"]))]}
    atomic_write_text(out / "results.json", json.dumps(record, indent=1) + "\n")
    atomic_write_text(out / "results.md", markdown(summary, meta))
    plot(result["mean_curves"], summary, out / "curves.png")
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
