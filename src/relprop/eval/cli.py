"""``relprop eval NAME``: every registered benchmark (``runner.BENCHMARKS``) from the shell,
with one shape: the benchmark's own options (``Benchmark.add_arguments``) plus the runner's
(--out, --restart, --methods, --option, --start-layer, --limit, --batch-size, --device,
--launcher ...).

A rerun into the same ``--out`` resumes; results made with other model weights, data or
settings are refused (``--restart`` moves them aside), and a folder in use by another run is
refused (see ``rundir``). ``--launcher torchrun --nproc-per-node N`` runs the command under
``torchrun`` (as does ``torchrun --nproc-per-node N -m relprop eval ...``): sample i goes to
rank i % N, rank 0 merges and writes the summary.

Wire into the top-level parser with ``register(subparsers)``; the ``eval`` parser sets
``run=run``, and ``run(args)`` returns the exit status or raises a ``RelpropError``
(``relprop.cli.main`` prints it as one line).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from ..cli import positive_int
from ..errors import Interrupted, OptionError, RunFailure, UnknownMethodError, UsageError, did_you_mean
from ..files import output_dir
from .runner import BENCHMARKS, Benchmark, SilentRankError, run_benchmark

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("transformer_attribution", "rollout", "raw_attention", "attn_gradcam",
                   "partial_lrp", "lrp", "grad_rollout", "attnlrp", "cp_lrp")
# Modules whose import registers their benchmarks (``register_benchmark``).
BENCHMARK_MODULES = ("relprop.eval.perturbation", "relprop.eval.segmentation", "relprop.eval.class_specificity",
                     "relprop.eval.rationale")
# How long a rank other than 0 waits before failing (see ``_other_rank_exit``).
OTHER_RANK_EXIT_DELAY_S = 5.0
# The methods that --start-layer sets start_layer of.
START_LAYER_METHODS = ("transformer_attribution", "rollout")


def benchmarks() -> dict[str, type[Benchmark]]:
    """The registered benchmarks by command name, after importing ``BENCHMARK_MODULES``."""
    for module in BENCHMARK_MODULES:
        importlib.import_module(module)
    return dict(sorted(BENCHMARKS.items()))


def _add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="output folder; rerunning the same command into it resumes (it refuses results of "
                             "other model weights, data or settings: see --restart)")
    parser.add_argument("--restart", action="store_true",
                        help="start over: move this benchmark's earlier results in --out into "
                             "--out/previous-<time>/ instead of resuming")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help="explanation methods (default: all nine)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD:NAME=VALUE",
                        help="an option of one method, passed to Explainer.explain (repeatable; VALUE is read "
                             "as JSON, else as a string), e.g. --option transformer_attribution:start_layer=1")
    parser.add_argument("--start-layer", type=int,
                        help="start_layer of transformer_attribution and rollout (default: relprop's, 0 for "
                             "vision; the authors' ViT benchmark scripts used 1); short for two --option")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate only the first N samples (sorted order)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="samples per explanation pass (default 8)")
    parser.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (default: cuda if available, else "
                                         "cpu; under torchrun each rank takes cuda:LOCAL_RANK)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--launcher", choices=["none", "torchrun"], default="none",
                        help="torchrun: run this command in --nproc-per-node processes (torch.distributed; "
                             "gloo on CPU, nccl on GPU), sample i on rank i %% N")
    parser.add_argument("--nproc-per-node", type=positive_int, default=1, metavar="N",
                        help="processes for --launcher torchrun (default 1)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with one subcommand per registered benchmark."""
    found = benchmarks()
    parser = subparsers.add_parser(
        "eval", help="run a benchmark (" + ", ".join(found) + ")",
        description="Benchmarks of Chefer et al. (CVPR 2021), defined as in the authors' scripts, and "
                    "relprop's own; all resumable, all through one runner.")
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{" + ",".join(found) + "}")
    for name, cls in found.items():
        bench = sub.add_parser(name, help=cls.help, description=cls.description or cls.help)
        cls.add_arguments(bench)
        _add_runner_arguments(bench)
        bench.set_defaults(benchmark=cls)
    parser.set_defaults(run=run)
    return parser


def check_methods(methods: Sequence[str]) -> None:
    """``UnknownMethodError`` for a method name relprop does not have."""
    import relprop

    for method in methods:
        if method not in relprop.methods():
            raise UnknownMethodError(f"unknown method {method!r} in --methods; available: "
                                     f"{', '.join(sorted(relprop.methods()))}.{did_you_mean(method, relprop.methods())}")


def make_explainer(model: torch.nn.Module, methods: Sequence[str]) -> Any:
    """``relprop.Explainer`` for the model, after checking the method names."""
    import relprop

    check_methods(methods)
    return relprop.Explainer(model)


def parse_options(specs: Sequence[str], start_layer: int | None, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, the options of ``--option METHOD:NAME=VALUE`` (and ``--start-layer``) for the
    methods that run; an option a method does not have is an ``OptionError``."""
    from ..attributions.base import get_method

    options: dict[str, dict[str, Any]] = {}
    if start_layer is not None:
        for method in START_LAYER_METHODS:
            options.setdefault(method, {})["start_layer"] = start_layer
    for spec in specs:
        method, colon, rest = spec.partition(":")
        name, equals, text = rest.partition("=")
        if not (colon and equals and method and name):
            raise UsageError(f"--option {spec!r}: expected METHOD:NAME=VALUE, e.g. "
                             "--option transformer_attribution:start_layer=1")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text  # a bare word: a string option
        options.setdefault(method, {})[name] = value
    for method in options:
        if method not in methods and method not in START_LAYER_METHODS:
            raise UsageError(f"--option for {method!r}, which is not among --methods ({', '.join(methods)})")
    chosen = {m: o for m, o in options.items() if m in methods}
    for method, given in chosen.items():
        known = get_method(method).options
        for name in given:
            if name not in known:
                raise OptionError(f"--option {method}:{name}: method {method!r} has no option {name!r}."
                                  f"{did_you_mean(name, known)} Its options: {', '.join(sorted(known)) or 'none'}")
    return chosen


def _device(spec: str | None) -> torch.device:
    """The ``--device`` to run on, checked before any work: a name torch does not know, or a
    device this machine or torch build lacks, is a usage error. Under torchrun a CUDA rank
    takes ``cuda:LOCAL_RANK``."""
    local_rank = os.environ.get("LOCAL_RANK")
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    try:
        torch.empty(1, device=device)
    except (AssertionError, RuntimeError) as error:  # torch says "not compiled with CUDA", "invalid device ordinal"
        raise UsageError(f"--device {spec} is not available here ({str(error).strip().splitlines()[0]}); "
                         "use --device cpu, or leave --device out") from None
    return device


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; prints a results table, returns the exit status. Problems
    are raised as ``RelpropError``s (on rank 0 only, under torchrun); Ctrl-C as
    ``Interrupted`` (finished results are kept)."""
    if args.launcher == "torchrun":
        return _launch_torchrun(args)
    rank = int(os.environ.get("RANK", "0"))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except SilentRankError as error:  # rank 0 prints it
        return _other_rank_exit(error.exit_code)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; rerun the same command to resume (finished results are kept in "
                          f"{args.out})") from None
    except Exception as error:
        if rank == 0:
            raise
        # Most errors happen on every rank alike: rank 0 reports them. One of this rank's own
        # is reported by this rank, if rank 0 has not failed (and been stopped) meanwhile.
        _other_rank_exit(0)
        print(f"relprop: error (rank {rank}): {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 1))


def _other_rank_exit(code: int) -> int:
    """A rank other than 0 waits a moment before it fails: torchrun stops every rank when the
    first one exits, and rank 0 must have printed the error line by then."""
    time.sleep(OTHER_RANK_EXIT_DELAY_S)
    return code


def _run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    distributed = _init_distributed(device)
    try:
        output_dir(args.out)
        args.methods = list(dict.fromkeys(args.methods))  # a method named twice is run once
        options = parse_options(args.option, args.start_layer, args.methods)
        cls: type[Benchmark] = args.benchmark
        benchmark = cls.from_args(args, device)
        explainer = make_explainer(benchmark.model, args.methods)
        summary = run_benchmark(benchmark, explainer, args.methods, args.out, options=options,
                                batch_size=args.batch_size, progress=not args.no_progress, restart=args.restart)
        if int(os.environ.get("RANK", "0")) == 0:
            benchmark.print_summary(summary)
            skipped = {f["id"] for f in summary["failed"]}
            if skipped:
                print(f"{len(skipped)} of {summary['samples']} samples skipped (unreadable, invalid or with "
                      "non-finite maps; listed under 'failed' in the summary)")
            print(f"results in {args.out}")
        return 0
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when started by torchrun
    with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Ranks wait for each other at the start (rank 0 checks the folder) and the end: allow a
    # slow rank a long time.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=6))
    return True


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Run this command (less --launcher) as ``torchrun --standalone --nproc-per-node N -m relprop
    eval ...``, in this process; returns the exit status of the failing rank (rank 0's, which
    printed the one-line error, when it failed) or 0. torchrun's own log lines are silenced."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = _argv_without_launcher(getattr(args, "argv", None) or sys.argv[1:])
    for name in ("torch.distributed", "torch.distributed.run", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads(args.nproc_per_node)))
    launch = torchrun.parse_args(["--standalone", f"--nproc-per-node={args.nproc_per_node}",
                                  "--module", "relprop", *argv])
    try:
        torchrun.run(launch)
    except ChildFailedError as failure:
        failures = dict(sorted(failure.failures.items()))
        printed = [f.exitcode for f in failures.values() if f.exitcode > 0]  # these ranks said why
        if printed:
            return printed[0]
        killed = ", ".join(f"rank {rank} by signal {-f.exitcode} ({f.signal_name()})" for rank, f in failures.items())
        raise RunFailure(f"processes were stopped ({killed}); rerun the same command to resume (finished "
                         f"results are kept in {args.out})") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; rerun the same command to resume (finished results are kept in "
                          f"{args.out})") from None
    return 0


def _threads(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // processes)


def _argv_without_launcher(argv: Sequence[str]) -> list[str]:
    """``argv`` without --launcher/--nproc-per-node (in either --flag value or --flag=value form)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--launcher", "--nproc-per-node"):
            skip = True
            continue
        if arg.startswith(("--launcher=", "--nproc-per-node=")):
            continue
        out.append(arg)
    return out
