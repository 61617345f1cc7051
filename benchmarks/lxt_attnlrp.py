"""LXT 2.1's AttnLRP on a saved model, timed and measured: the LXT column of ``bench_vit.py``.

Runs in LXT's own virtual environment (``pip install lxt==2.1 transformers==4.57.6``; LXT imports
only with ``transformers`` 4.x and is never a relprop dependency), started by ``bench_vit.py
--lxt-python PYTHON``; it imports nothing of relprop (only the runner's memory helpers). As LXT's README does: patch the family's
``transformers`` module (``lxt.efficient.monkey_patch(modeling_llama, patch_map=llama.attnLRP)``)
before loading the ``save_pretrained`` folder, then gradient x input at ``inputs_embeds`` (the
word-embedding output) of the target logit (for a causal LM the next-token logit at the last
position), parameters frozen so that autograd computes only the input gradient. Prints one JSON
line: the median seconds of ``--repeats`` calls after one warm-up, the peak resident set (or
peak allocated device memory) above the loaded model, and the relevance sum of the last call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# the runner's memory helpers (bench_vit imports relprop only inside its functions; this script
# runs from benchmarks/, so the sibling module is importable in LXT's environment)
from bench_vit import reset_peak_rss, rss_bytes




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", help="save_pretrained folder holding bench_inputs.pt (input_ids, "
                                         "attention_mask, target)")
    parser.add_argument("--family", choices=["llama", "bert"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--versions", action="store_true", help="print the versions of lxt, transformers, torch")
    args = parser.parse_args()
    from importlib.metadata import version

    import torch
    if args.versions:
        print(json.dumps({p: version(p) for p in ("lxt", "transformers", "torch")}))
        return
    import transformers
    from lxt.efficient import monkey_patch

    if args.family == "llama":
        from lxt.efficient.models import llama as rules
        from transformers.models.llama import modeling_llama as module
        model_class, causal = transformers.LlamaForCausalLM, True
    else:
        from lxt.efficient.models import bert as rules
        from transformers.models.bert import modeling_bert as module
        model_class, causal = transformers.BertForSequenceClassification, False
    monkey_patch(module, patch_map=rules.attnLRP)
    model = model_class.from_pretrained(args.folder, dtype=torch.float32).to(args.device).eval()
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.requires_grad_(False)
        tensor.data = tensor.data.clone()     # resident now: weights still mapped from the file are not the call's
    data = torch.load(os.path.join(args.folder, "bench_inputs.pt"))
    ids, mask, target = (data[k].to(args.device) for k in ("input_ids", "attention_mask", "target"))
    embedding = model.get_input_embeddings()
    cuda = args.device.startswith("cuda")

    def run():
        embeds = embedding(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        logits = logits[:, -1] if causal else logits
        logits.gather(1, target[:, None]).sum().backward()
        relevance = (embeds * embeds.grad).sum(-1)
        if cuda:
            torch.cuda.synchronize()
        return relevance

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_bytes("VmRSS:")
        reset_peak_rss()                                    # loading's transient peak is not the call's
    run()                                                   # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        relevance = run()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - before if cuda else rss_bytes("VmHWM:") - before
    print(json.dumps({"median_s": statistics.median(times), "times_s": times, "peak_bytes": peak,
                      "relevance_sum": relevance.sum(-1).tolist(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
