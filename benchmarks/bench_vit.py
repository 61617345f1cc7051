"""Speed and memory of every method, as ratios to a plain forward + backward of the same model.

Builds the model from a default-size configuration with random weights (float32, the model's
default SDPA attention): ``--model vit-b16`` (default: ``ViTForImageClassification``,
``vit-base-patch16-224``), ``bert-base-512`` (BERT-base, 512 tokens), ``clip-b32`` (CLIP ViT-B/32
vision tower with projection; score = the embedding's sum, a callable target), ``swin-t``,
``dinov2-s``, ``llama-long`` (a ``LlamaForCausalLM`` of Llama-3.2-1B's width: hidden 2048, 32
heads, 8 key-value heads, MLP 8192; a 32,000-token vocabulary and ``--layers`` decoder layers,
default 2, where the 1B model has 16; score = the next-token logit at the last position; run at
each of ``--lengths``, default 512 1024 2048 4096). Then, in one run and interleaved, it times a forward + backward of the explained
score (the baseline: what a user's own gradient computation costs) and each method, at batch 1
and 8. Peak memory is measured per configuration in a fresh subprocess (peak resident set size
above the loaded model); on a GPU (``--device cuda``) as the peak of allocated device memory
above the loaded model, in process.

The forward + backward baseline includes the parameter gradients (``.backward()`` as a user
calls it); text models also get the row ``forward+backward to inputs``: the gradient at the
word embeddings only (``torch.autograd.grad``, no parameter gradient), the cost of a gradient x
input explanation, which is what AttnLRP and CP-LRP claim to match.

``--lxt-python PYTHON`` (llama-long, bert-base-512: the python of a separate virtual environment
with ``lxt==2.1`` and ``transformers==4.57.6``, never a relprop dependency) saves the model with
``save_pretrained`` and, per length and batch, right after relprop's timed loop, runs LXT's
AttnLRP on the same weights, inputs and target in that python (``benchmarks/lxt_attnlrp.py``, its
own process: median of ``--repeats`` after one warm-up, peak memory above the loaded model); the
``attnlrp`` rows get ``time_vs_lxt`` and ``memory_vs_lxt`` (relprop ÷ LXT).

``--baseline PATH`` (a relprop source tree, e.g. ``git worktree add /tmp/old <commit>``) adds that
version's methods, imported from there under another package name, to the same interleaved loop
(rows ``baseline <method>``), so an engine change is measured against the old one in one run.
The first call of a method on a model exports its graph (once per model and input signature);
that time is reported separately (``export_s``) and excluded from the timed repeats.

``--reference PATH`` (a local checkout of github.com/hila-chefer/Transformer-Explainability; it
is imported from there at run time, never copied into this repository; it needs ``einops``)
adds the authors' ``LRP.generate_LRP`` (method ``transformer_attribution``, their default
start layer 0, as relprop's) on their ViT holding the same weights, to the same interleaved
loop. Their code explains one image per call, so a batch of B is timed as B single-image
calls. Before timing, the run checks on one image that their logits and map equal the Hugging
Face model's and relprop's (float32, and float64 where the LRP map is well conditioned).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_vit.py --repeats 5 --out benchmarks/results/vit_b16.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_vit.py --repeats 5 --reference ../Transformer-Explainability \
        --out benchmarks/results/vit_b16.json
    python benchmarks/bench_vit.py --device cuda --batches 1 8 32 --out benchmarks/results/vit_b16_cuda.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_vit.py --model llama-long --layers 2 --lengths 512 1024 2048 \
        --batches 1 --repeats 1 --lxt-python LXT_VENV/bin/python --out benchmarks/results/llama-long-2layers.json
    python benchmarks/bench_vit.py --model llama-long --layers 16 --device cuda --batches 1 --repeats 3 \
        --lxt-python LXT_VENV/bin/python --out benchmarks/results/llama-long_cuda.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REFERENCE = "reference generate_LRP (authors' code)"
BASELINE = "baseline "           # + method: the same method of the --baseline relprop version
INPUT_GRADIENT = "forward+backward to inputs"   # the gradient at the word embeddings only, no parameter gradients
LXT = "LXT attnlrp"              # LXT 2.1's AttnLRP in its own virtual environment (--lxt-python)
LLAMA_LAYERS = 2                 # llama-long's default depth: 16 layers at 4,096 tokens do not fit a 2-core CPU run
METHODS = ["transformer_attribution", "rollout", "raw_attention", "attn_gradcam", "partial_lrp", "lrp", "grad_rollout"]


def build_model(name: str = "vit-b16", layers: int | None = None):
    """A model of ``MODELS[name]`` from its default-size configuration, random weights, eval mode;
    ``layers`` (llama-long only) sets its number of decoder layers."""
    torch.manual_seed(0)
    if layers is not None and name != "llama-long":
        raise SystemExit("--layers works with --model llama-long only")
    return (MODELS[name].build(layers) if layers is not None else MODELS[name].build()).eval()


def _vit_b16():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, num_labels=1000, layer_norm_eps=1e-12)
    return ViTForImageClassification(config)


def _bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=2))


def _llama_long(layers: int = LLAMA_LAYERS):
    """Llama-3.2-1B's width (hidden 2048, 32 heads, 8 key-value heads, MLP 8192) with a 32,000-token
    vocabulary (1B's is 128,256) and ``layers`` decoder layers (1B has 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=32000, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def _clip_b32():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, projection_dim=512))


def _swin_t():
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(num_labels=1000))      # the default config is Swin-T


def _dinov2_s():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                          patch_size=14, num_labels=1000)
    return Dinov2ForImageClassification(config)


class Bench:
    """One benchmarked model: how to build it, a batch of inputs, and the score explained
    (the same score the forward + backward baseline differentiates)."""

    def __init__(self, build, kind: str, size: int = 224, length: int = 512, methods=None, lengths=None):
        self.build, self.kind, self.size, self.length = build, kind, size, length
        self.methods = methods or METHODS           # the default --methods
        self.lengths = lengths or [length]          # the default --lengths (text models)

    @property
    def text(self) -> bool:
        return self.kind in ("text", "causal")

    def inputs(self, batch: int, device, length: int | None = None) -> dict:
        gen = torch.Generator().manual_seed(1)
        if self.text:
            ids = torch.randint(1000, 20000, (batch, length or self.length), generator=gen)
            ids[:, 0] = 101 if self.kind == "text" else 1      # [CLS] / <s>
            return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        return {"pixel_values": torch.randn(batch, 3, self.size, self.size, generator=gen).to(device)}

    def score(self, output, batch: int):
        """Per-sample score: a logit (classifiers; for a causal LM the next-token logit at the last
        position) or the embedding's projection on a fixed direction."""
        if self.kind == "embedding":
            direction = torch.ones(output.image_embeds.shape[-1], device=output.image_embeds.device)
            return output.image_embeds @ direction
        logits = output.logits[:, -1] if self.kind == "causal" else output.logits
        target = self.target(batch, logits.device)
        return logits.gather(1, target[:, None]).squeeze(1)

    def target(self, batch: int, device):
        if self.kind == "embedding":
            return lambda output: self.score(output, batch)
        classes = {"text": 2, "causal": 1000}.get(self.kind, 1000)
        return (torch.arange(batch) % classes).to(device)


MODELS = {
    "vit-b16": Bench(_vit_b16, "image"),
    "bert-base-512": Bench(_bert_base, "text"),
    "clip-b32": Bench(_clip_b32, "embedding"),
    "swin-t": Bench(_swin_t, "image"),
    "dinov2-s": Bench(_dinov2_s, "image"),
    "llama-long": Bench(_llama_long, "causal", methods=["attnlrp", "cp_lrp", "transformer_attribution"],
                        lengths=[512, 1024, 2048, 4096]),
}


def load_reference(path: str):
    """The authors' ``VisionTransformer`` class and ``LRP`` explainer, imported from their checkout."""
    root = os.path.abspath(path)
    if not os.path.isfile(os.path.join(root, "baselines", "ViT", "ViT_LRP.py")):
        raise SystemExit(f"--reference {path}: no baselines/ViT/ViT_LRP.py there; pass a local checkout of "
                         "github.com/hila-chefer/Transformer-Explainability")
    if root not in sys.path:
        sys.path.append(root)       # appended: their top-level names never shadow installed packages
    try:
        from baselines.ViT.ViT_explanation_generator import LRP
        from baselines.ViT.ViT_LRP import VisionTransformer
    except ModuleNotFoundError as error:
        raise SystemExit(f"--reference: the authors' code needs the package {error.name!r}; "
                         f"install it (pip install {error.name}) or run without --reference") from None
    return VisionTransformer, LRP


def reference_model(model, vision_transformer_class, dtype=torch.float32):
    """The authors' ViT holding the weights of ``model`` (a Hugging Face ``ViTForImageClassification``,
    transformers 5 parameter names), in eval mode, on its device, in ``dtype``."""
    config = model.config
    if config.hidden_act != "gelu":
        raise SystemExit(f"--reference: the authors' ViT uses exact GELU; this model uses {config.hidden_act!r}")
    reference = vision_transformer_class(
        img_size=config.image_size, patch_size=config.patch_size, in_chans=config.num_channels,
        num_classes=config.num_labels, embed_dim=config.hidden_size, depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads, mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias)
    for module in reference.modules():     # theirs are fixed at 1e-6 in the blocks and 1e-5 at the end
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = config.layer_norm_eps
    hf = model.state_dict()
    weights = {"cls_token": hf["vit.embeddings.cls_token"], "pos_embed": hf["vit.embeddings.position_embeddings"]}
    pairs = [("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"), ("norm", "vit.layernorm"),
             ("head", "classifier")]
    for i in range(config.num_hidden_layers):
        theirs, ours = f"blocks.{i}.", f"vit.layers.{i}."
        pairs += [(theirs + "attn.proj", ours + "attention.o_proj"), (theirs + "norm1", ours + "layernorm_before"),
                  (theirs + "norm2", ours + "layernorm_after"), (theirs + "mlp.fc1", ours + "mlp.fc1"),
                  (theirs + "mlp.fc2", ours + "mlp.fc2")]
        for part in ("weight", "bias"):    # fused qkv: rows [q; k; v], heads contiguous within each
            weights[f"{theirs}attn.qkv.{part}"] = torch.cat([hf[f"{ours}attention.{n}_proj.{part}"] for n in "qkv"])
    for theirs, ours in pairs:
        for part in ("weight", "bias"):
            weights[f"{theirs}.{part}"] = hf[f"{ours}.{part}"]
    reference.load_state_dict(weights)     # strict: every parameter of theirs is set, none left over
    return reference.to(device=next(model.parameters()).device, dtype=dtype).eval()


@contextlib.contextmanager
def cuda_call_kept_on_cpu(device: torch.device):
    """The authors' ``generate_LRP`` moves its one-hot target with ``.cuda()`` whatever the device; on a
    CPU run that call leaves the tensor where it is (nothing else of theirs needs a GPU)."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def reference_explain(reference_lrp, image, target: int):
    """The authors' map (their ``transformer_attribution`` with their default start layer 0, which
    is relprop's vision default too) for one image [1, C, H, W]."""
    with cuda_call_kept_on_cpu(image.device):
        return reference_lrp.generate_LRP(image, index=target, method="transformer_attribution", start_layer=0)


def check_reference(model, reference_path: str) -> dict:
    """On one image: the authors' logits against the Hugging Face model's and their map against
    relprop's ``transformer_attribution``, in float32 (what is timed) and float64 (the float32 LRP
    map is ill-conditioned, see the README's Correctness section)."""
    import copy

    import relprop

    vision_transformer_class, lrp_class = load_reference(reference_path)
    device = next(model.parameters()).device
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    target = 0                              # the class the batch-1 timing explains
    check = {"target": target}
    for dtype in (torch.float32, torch.float64):
        ours = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        theirs = lrp_class(reference_model(model, vision_transformer_class, dtype))
        with torch.no_grad():
            our_logits = ours(pixel_values=x.to(dtype)).logits
        their_logits = theirs.model(x.to(dtype)).detach()     # their forward registers gradient hooks
        our_map = relprop.Explainer(ours).explain(x.to(dtype), "transformer_attribution", target=target,
                                                  start_layer=0).relevance
        their_map = reference_explain(theirs, x.to(dtype), target)
        name = str(dtype).removeprefix("torch.")
        check[name] = {"logits_max_abs_diff": (our_logits - their_logits).abs().max().item(),
                       "logits_max_abs": our_logits.abs().max().item(),
                       "map_max_abs_diff_rel": ((our_map - their_map).abs().max() / our_map.abs().max()).item()}
        print(f"reference check {name}: {json.dumps(check[name])}", flush=True)
    return check


def load_baseline(path: str):
    """The relprop package of the source tree ``path``, imported as ``relprop_baseline`` (its modules
    import each other relatively, so two versions live side by side in one process)."""
    root = os.path.join(os.path.abspath(path), "src", "relprop")
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        raise SystemExit(f"--baseline {path}: no src/relprop/__init__.py there; pass a relprop source tree")
    if "relprop_baseline" not in sys.modules:
        spec = importlib.util.spec_from_file_location("relprop_baseline", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules["relprop_baseline"] = module
        spec.loader.exec_module(module)
    return sys.modules["relprop_baseline"]


def reference_commit(path: str) -> str | None:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def make_runner(model, name, batch, reference_lrp=None, baseline=None, length=None):
    """A call that runs ``name`` once on a batch (of ``length`` tokens, text models); ``reference_lrp``
    (the authors' LRP explainer on the same weights) is needed for the reference row, ``baseline``
    (another relprop package) for the baseline rows."""
    import relprop

    device = next(model.parameters()).device
    bench = MODELS[getattr(model, "bench_name", "vit-b16")]
    inputs = bench.inputs(batch, device, length)
    x = inputs.get("pixel_values")
    target = bench.target(batch, device)
    if name == "forward+backward":          # parameter gradients included: what model.backward() costs a user
        def run():
            model.zero_grad(set_to_none=True)
            bench.score(model(**inputs), batch).sum().backward()
    elif name == INPUT_GRADIENT:             # gradient x input's cost: autograd computes no parameter gradient
        if not bench.text:
            raise SystemExit(f"{INPUT_GRADIENT!r} is measured on text models only")
        ids = inputs["input_ids"]
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}

        def run():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            torch.autograd.grad(bench.score(model(inputs_embeds=embeds, **rest), batch).sum(), embeds)
    elif name == REFERENCE:
        targets = target.tolist()

        def run():                          # their code explains one image per call
            for i, image_target in enumerate(targets):
                reference_explain(reference_lrp, x[i:i + 1], image_target)
    else:
        package = relprop
        if name.startswith(BASELINE):
            package, name = baseline, name.removeprefix(BASELINE)
        explainer = package.Explainer(model)
        method = name

        def run():
            run.result = explainer.explain(inputs, method, target=target)     # kept: the LXT agreement check
        run.explainer = explainer
    if device.type != "cuda":
        return run

    def run_synchronized():      # GPU work is asynchronous: time it to completion
        run()
        torch.cuda.synchronize(device)
    return run_synchronized


def measure_cuda_memory(model, name: str, batch: int, reference_lrp=None, baseline=None, length=None) -> int:
    """Peak allocated device memory of one call above what was allocated before it (the model)."""
    run = make_runner(model, name, batch, reference_lrp, baseline, length)
    run()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated() - before


def reset_peak_rss() -> None:
    """Start VmHWM anew from the current resident set (Linux: ``5`` to clear_refs), so a transient peak
    of loading the model is not taken for the call's."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def rss_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``"VmRSS:"``, ``"VmHWM:"``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reference_lrp_for(model, reference_path: str):
    """The authors' LRP explainer on their ViT holding ``model``'s weights."""
    vision_transformer_class, lrp_class = load_reference(reference_path)
    return lrp_class(reference_model(model, vision_transformer_class))


def peak_memory_child(model_name: str, name: str, batch: int, reference_path: str | None,
                      baseline_path: str | None, layers: int | None = None, length: int | None = None) -> None:
    model = build_model(model_name, layers)
    model.bench_name = model_name
    reference_lrp = reference_lrp_for(model, reference_path) if name == REFERENCE else None
    baseline = load_baseline(baseline_path) if name.startswith(BASELINE) else None
    run = make_runner(model, name, batch, reference_lrp, baseline, length)   # both models are loaded before `before`
    if name not in ("forward+backward", INPUT_GRADIENT, REFERENCE):
        # the export (paid once per model; any text length reuses it) is not part of a call's memory
        make_runner(model, name, 1, reference_lrp, baseline, 16 if MODELS[model_name].text else None)()
    before = rss_bytes("VmRSS:")
    reset_peak_rss()
    run()
    run()
    print(json.dumps({"peak_bytes": rss_bytes("VmHWM:") - before}))


def measure_memory(model_name: str, name: str, batch: int, reference_path: str | None = None,
                   baseline_path: str | None = None, layers: int | None = None, length: int | None = None) -> int:
    reference = ["--reference", reference_path] if name == REFERENCE else []
    if name.startswith(BASELINE):
        reference = ["--baseline", baseline_path]
    shape = (["--layers", str(layers)] if layers is not None else []) + (["--lengths", str(length)] if length else [])
    out = subprocess.run([sys.executable, __file__, "--model", model_name, "--memory-child", name, str(batch),
                          *reference, *shape],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit-b16",
                        help="vit-b16 (default), bert-base-512 (512 tokens), clip-b32 (vision tower + projection, "
                             "score = the embedding's sum), swin-t, dinov2-s, llama-long (Llama-3.2-1B width, "
                             f"{LLAMA_LAYERS} layers, 32,000-token vocabulary); default-size configs, random weights")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", help="default: the model's (llama-long: attnlrp cp_lrp "
                                                      "transformer_attribution; others: the CVPR'21 family)")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="text models: token counts to run (llama-long default: 512 1024 2048 4096)")
    parser.add_argument("--layers", type=int, help=f"llama-long: decoder layers (default {LLAMA_LAYERS}; "
                                                   "Llama-3.2-1B has 16)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--reference", metavar="PATH",
                        help="local checkout of github.com/hila-chefer/Transformer-Explainability: "
                             "also time the authors' generate_LRP on the same weights")
    parser.add_argument("--baseline", metavar="PATH",
                        help="another relprop source tree (e.g. a worktree of an older commit): also time its methods")
    parser.add_argument("--lxt-python", metavar="PYTHON",
                        help="the python of a virtual environment with lxt==2.1 and transformers==4.57.6 (never a "
                             "relprop dependency): also time LXT's AttnLRP on the same weights (llama-long, "
                             "bert-base-512); without it the LXT rows are skipped")
    parser.add_argument("--out")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bench = MODELS[args.model]
    if args.layers is not None and (args.model != "llama-long" or args.layers < 1):
        parser.error("--layers takes a positive number of layers, with --model llama-long only")
    if args.lengths and (not bench.text or min(args.lengths) < 2):
        parser.error("--lengths takes token counts of at least 2, with a text model (bert-base-512, llama-long)")
    if args.lxt_python and args.model not in LXT_FAMILIES:
        parser.error(f"--lxt-python works with --model {' or '.join(sorted(LXT_FAMILIES))}")
    if args.lxt_python and not os.access(args.lxt_python, os.X_OK):
        parser.error(f"--lxt-python {args.lxt_python}: no such executable; pass the python of the LXT environment")
    if args.reference and args.model != "vit-b16":
        parser.error("--reference (the authors' ViT code) works with --model vit-b16 only")
    args.methods = args.methods or bench.methods
    args.lengths = args.lengths or (bench.lengths if bench.text else [None])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        peak_memory_child(args.model, args.memory_child[0], int(args.memory_child[1]), args.reference, args.baseline,
                          args.layers, args.lengths[0])
        return
    bench = MODELS[args.model]
    model = build_model(args.model, args.layers).to(args.device)
    model.bench_name = args.model
    names = ["forward+backward"] + ([INPUT_GRADIENT] if bench.text else []) + args.methods
    results = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
               "load_average_before": os.getloadavg(), "rows": []}   # the machine's other work, 1/5/15 min
    if args.model == "llama-long":
        results["config"] = {k: getattr(model.config, k) for k in
                             ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "intermediate_size", "vocab_size")}
    reference_lrp = None
    if args.reference:
        results["reference"] = {"code": "github.com/hila-chefer/Transformer-Explainability",
                                "commit": reference_commit(args.reference),
                                "check": check_reference(model, args.reference)}
        reference_lrp = reference_lrp_for(model, args.reference)
        names.append(REFERENCE)
    baseline = None
    if args.baseline:
        baseline = load_baseline(args.baseline)
        results["baseline"] = {"path": os.path.abspath(args.baseline), "commit": reference_commit(args.baseline)}
        names += [BASELINE + m for m in args.methods]
    lxt_folder = None
    if args.lxt_python:
        lxt_folder = tempfile.TemporaryDirectory(prefix="relprop-bench-lxt-")
        model.save_pretrained(lxt_folder.name)     # LXT loads the very same weights
        config_for_transformers4(lxt_folder.name)
        results["lxt"] = lxt_versions(args.lxt_python)
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
        memory = lambda name, batch, length: measure_cuda_memory(  # noqa: E731
            model, name, batch, reference_lrp, baseline, length)
    else:
        memory = lambda name, batch, length: measure_memory(  # noqa: E731
            args.model, name, batch, args.reference, args.baseline, args.layers, length)
    for length in args.lengths:
        for batch in args.batches:
            runners = {name: make_runner(model, name, batch, reference_lrp, baseline, length) for name in names}
            for run in runners.values():       # warm-up (a method's first call on the model exports its graph)
                run()
            tracer = getattr(getattr(runners.get("transformer_attribution"), "explainer", None), "tracer", None)
            if tracer is not None and tracer.programs:
                results.setdefault("export_s", {})[str(batch)] = [round(p.trace_seconds, 3) for p in tracer.programs]
            times = {name: [] for name in names}
            for _ in range(args.repeats):      # interleaved, so machine noise hits every entry alike
                for name, run in runners.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            ours = getattr(runners.get("attnlrp"), "result", None)
            del runners
            lxt = None
            if lxt_folder is not None:         # its own process, right after relprop's loop on the same inputs
                lxt = measure_lxt(args.lxt_python, lxt_folder.name, args.model, batch, length, args.repeats,
                                  args.device)
                times[LXT] = [lxt["median_s"]]
                if ours is not None:           # the same map? (float32, so not to the last digit)
                    results.setdefault("lxt_agreement", []).append(
                        {"length": length, "batch": batch, "relprop_relevance_sum": ours.relevance.sum(-1).tolist(),
                         "lxt_relevance_sum": lxt["relevance_sum"]})
            del ours
            base_time = statistics.median(times["forward+backward"])
            base_mem = None if args.no_memory else memory("forward+backward", batch, length)
            for name in times:
                median = statistics.median(times[name])
                row = {"batch": batch, "method": name, "median_s": median, "per_image_s": median / batch,
                       "time_ratio": median / base_time}
                if length is not None:
                    row["length"] = length
                if base_mem is not None:
                    mem = {"forward+backward": base_mem, LXT: lxt and lxt["peak_bytes"]}.get(name)
                    mem = memory(name, batch, length) if mem is None else mem
                    row.update(peak_mib=mem / 2**20, memory_ratio=mem / base_mem)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            if lxt is not None:
                add_lxt_ratios(results["rows"])
    results["load_average_after"] = os.getloadavg()
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    print(markdown_table(results["rows"]))


LXT_FAMILIES = {"llama-long": "llama", "bert-base-512": "bert"}     # bench model -> LXT's patch module
LXT_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lxt_attnlrp.py")


def config_for_transformers4(folder: str) -> None:
    """``transformers`` 5 writes RoPE's base under ``rope_parameters``; 4.x (LXT's environment)
    reads ``rope_theta`` and would fall back to 10,000: write it where 4.x looks too."""
    path = os.path.join(folder, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        with open(path, "w") as handle:
            json.dump(config, handle, indent=2)


def lxt_versions(python: str) -> dict:
    out = subprocess.run([python, LXT_CHILD, "--versions"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_lxt(python: str, folder: str, model_name: str, batch: int, length: int, repeats: int,
                device: str) -> dict:
    """LXT's AttnLRP (gradient x input at the word embeddings of its patched model) on the saved
    weights and the same inputs and target as relprop's rows, in the LXT environment's python:
    median seconds of ``repeats`` calls after one warm-up, and peak memory above the loaded model."""
    bench = MODELS[model_name]
    inputs = bench.inputs(batch, "cpu", length)
    torch.save({**inputs, "target": bench.target(batch, "cpu")}, os.path.join(folder, "bench_inputs.pt"))
    out = subprocess.run([python, LXT_CHILD, "--folder", folder, "--family", LXT_FAMILIES[model_name],
                          "--repeats", str(repeats), "--device", device],
                         capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if out.returncode != 0:
        raise SystemExit(f"the LXT run failed (--lxt-python {python}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_lxt_ratios(rows) -> None:
    """On each ``attnlrp`` row that has an LXT row of the same shape: relprop's time and memory ÷ LXT's."""
    lxt = {(r["batch"], r.get("length")): r for r in rows if r["method"] == LXT}
    for row in rows:
        theirs = lxt.get((row["batch"], row.get("length")))
        if row["method"] == "attnlrp" and theirs:
            row["time_vs_lxt"] = row["median_s"] / theirs["median_s"]
            if "peak_mib" in row:
                row["memory_vs_lxt"] = row["peak_mib"] / theirs["peak_mib"]


def markdown_table(rows) -> str:
    long = any("length" in r for r in rows)
    lxt = any("time_vs_lxt" in r for r in rows)
    head = ["tokens"] * long + ["batch", "method", "median s", "s / image", "time ÷ fwd+bwd", "peak MiB",
                                "memory ÷ fwd+bwd"] + ["time ÷ LXT", "memory ÷ LXT"] * lxt
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nan = float("nan")
    for r in rows:
        cells = [str(r.get("length"))] * long + [
            str(r["batch"]), r["method"], f"{r['median_s']:.3f}", f"{r['per_image_s']:.3f}", f"{r['time_ratio']:.2f}",
            f"{r.get('peak_mib', nan):.0f}", f"{r.get('memory_ratio', nan):.2f}"]
        if lxt:
            cells += [f"{r['time_vs_lxt']:.2f}", f"{r.get('memory_vs_lxt', nan):.2f}"] if "time_vs_lxt" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
