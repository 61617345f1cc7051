"""One runner for every benchmark: ``Benchmark`` says what a benchmark computes, ``run_benchmark``
runs it.

The loop, the same for all: open the run's folder (``rundir``: lock, identity, ``--restart``)
-> the record store (``store``, one JSONL line per sample and method) -> the samples still
pending (a rerun resumes) -> batches of loaded samples -> per method, explain and turn the maps
into records -> the summary from the records (pure: metrics are functions of maps and ground
truth, computed in ``Benchmark.records``; the summary only aggregates) -> tables and plots.

Under ``torch.distributed`` (``torchrun``) sample i goes to rank i % N; each rank appends to
``<name>.rank<R>.jsonl``; rank 0 alone locks the folder, merges the rank files into
``<name>.jsonl`` (at the start, what a killed run left, and at the end) and writes the summary.

``register_benchmark`` adds a ``Benchmark`` subclass to ``BENCHMARKS``, from which ``relprop
eval NAME`` builds its subcommands; plumbing shared by the benchmarks follows.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from ..errors import InputError, RelpropError, RunFailure
from ..files import atomic_write_text
from .rundir import Run, open_run
from .store import Record, ResultStore

log = logging.getLogger(__name__)

class Sample(Protocol):
    @property
    def id(self) -> str: ...


S = TypeVar("S", bound=Sample)
T = TypeVar("T")


class Explanation(Protocol):
    relevance: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor

    def upsampled(self, size: tuple[int, int]) -> torch.Tensor: ...


class Explainer(Protocol):
    """The part of ``relprop.Explainer`` the benchmarks use."""

    def explain(self, pixel_values: torch.Tensor, method: str, target: Any = None) -> Explanation: ...


@dataclass(frozen=True)
class Failure:
    id: str
    error: str


def pending_samples(samples: Sequence[Any], is_done: Callable[[Any], bool], what: str = "samples") -> list[Any]:
    """The samples still to do (a rerun resumes where the last one stopped)."""
    pending = [s for s in samples if not is_done(s)]
    if len(pending) < len(samples):
        log.info("resuming: %d of %d %s already done", len(samples) - len(pending), len(samples), what)
    return pending


def load_batches(
    samples: Sequence[S],
    load: Callable[[S], T],
    batch_size: int,
    failures: list[Failure],
    progress: bool = True,
    desc: str = "",
    unit: str = "img",
) -> Iterator[tuple[list[S], list[T]]]:
    """Yield (samples, loaded) batches of up to ``batch_size`` readable samples.

    A sample whose ``load`` raises is logged and appended to ``failures``, never dropped
    silently; the run continues with the others.
    """
    batch: list[S] = []
    loaded: list[T] = []
    with tqdm(total=len(samples), desc=desc, unit=unit, disable=not progress) as bar:
        for sample in samples:
            try:
                loaded.append(load(sample))
                batch.append(sample)
            except Exception as error:  # any decode/read error: report and skip the sample
                failures.append(Failure(sample.id, f"{type(error).__name__}: {error}"))
                log.warning("skipping unreadable sample %s: %s", sample.id, failures[-1].error)
                bar.update(1)
            if len(batch) == batch_size:
                yield batch, loaded
                bar.update(len(batch))
                batch, loaded = [], []
        if batch:
            yield batch, loaded
            bar.update(len(batch))


def logits_function(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> logits`` for a Hugging Face model (``model(pixel_values=x).logits``) or a
    plain module returning logits (timm)."""
    if "pixel_values" in inspect.signature(model.forward).parameters:
        return lambda x: model(pixel_values=x).logits
    return model


@torch.no_grad()
def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Top-1 classes of a normalised batch, forwarded ``chunk`` images at a time."""
    return torch.cat([logits_fn(x[i : i + chunk]).argmax(dim=-1) for i in range(0, len(x), chunk)])


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def report_non_finite(failures: list[Failure], sample_id: str, method: str) -> None:
    """Record a sample whose relevance map is NaN/inf: it is skipped and listed, never scored."""
    failures.append(Failure(sample_id, f"{method}: non-finite relevance map"))
    log.warning("skipping %s for %s: non-finite relevance map", sample_id, method)


def require_results(samples: Sequence[Any], failures: Sequence[Failure], stored: Iterable[str]) -> None:
    """Refuse a run in which every sample failed (``stored``: ids with results), instead of
    reporting an empty success."""
    if not samples or set(stored) & {s.id for s in samples}:
        return
    first = failures[0] if failures else Failure("-", "no failure recorded")
    raise InputError(f"no sample could be evaluated: all {len(samples)} failed (e.g. {first.id}: {first.error}); "
                     "check the data (--data) and the settings")


def write_summary(path: Path, summary: dict[str, Any], run: Run, n_samples: int,
                  failures: Sequence[Failure]) -> dict[str, Any]:
    """Add the run's settings and failures to ``summary`` and write it atomically; returns it."""
    summary.update(settings=run.settings, settings_id=run.cfg, provenance=run.provenance, samples=n_samples,
                   failed=[{"id": f.id, "error": f.error} for f in failures])
    write_json(path, summary)
    return summary


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so a crash never leaves a half-written summary behind."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


Explain = Callable[..., Any]
"""``explain(inputs, target=None)``: the explainer's ``explain`` for one method, with that
method's options (``--option``) bound."""


class Benchmark(ABC):
    """What one benchmark computes; ``run_benchmark`` does the rest (folder, store, resume,
    batches, distribution, progress).

    A subclass sets ``name`` (file prefix; ``relprop eval`` spells it with dashes) and
    ``help``, and implements ``load`` (one sample -> what ``records`` needs of it; raising marks
    the sample unreadable), ``records`` and ``summarise``. It may override ``key_fields`` and
    ``keys`` (several records per sample and method, e.g. the perturbation test's two modes),
    ``collate`` (work shared by all methods of a batch), ``write_reports`` (tables, plots),
    ``baselines``/``baseline_records`` (rows that need no explainer, e.g. a random map) and, for
    the command line, ``add_arguments``/``from_args``/``print_summary``.
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""
    description: ClassVar[str] = ""
    unit: ClassVar[str] = "img"  # what the progress bar counts
    key_fields: ClassVar[tuple[str, ...]] = ("method", "id")
    baselines: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module, samples: Sequence[Any], config: Any,
                 identity: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None):
        self.model = model
        self.samples = list(samples)
        self.config = config  # has .settings(): what changes a record's value
        self.identity = dict(identity or {})  # what else changes it (data kind, labels)
        self.provenance = dict(provenance or {})  # noted only (paths)

    # -- what a subclass defines ------------------------------------------------------------
    @abstractmethod
    def load(self, sample: Any) -> Any:
        """One sample, loaded (runs before any explaining; an exception skips the sample)."""

    def collate(self, samples: list[Any], loaded: list[Any]) -> Any:
        """A batch, as ``records`` gets it; by default the pair (samples, loaded)."""
        return samples, loaded

    @abstractmethod
    def records(self, explain: Explain, method: str, batch: Any, needs: list[list[tuple]],
                failures: list[Failure]) -> list[Record]:
        """Records of ``method`` for the batch rows whose ``needs`` (missing keys, see
        ``keys``) are not empty, without the run's stamp (``cfg``, ``src``)."""

    def baseline_records(self, name: str, batch: Any, needs: list[list[tuple]],
                         failures: list[Failure]) -> list[Record]:
        """Records of the baseline row ``name`` (one of ``baselines``): no explainer."""
        raise NotImplementedError(f"{type(self).__name__} has no baseline {name!r}")

    @abstractmethod
    def summarise(self, records: Mapping[tuple, Record], ids: Sequence[str], methods: Sequence[str],
                  cfg: str) -> dict[str, Any]:
        """The summary from the stored records (keyed by ``("cfg", *key_fields)``)."""

    def write_reports(self, summary: Mapping[str, Any], folder: Path) -> None:
        """Tables and plots beside the summary."""

    def keys(self, sample_id: str, method: str) -> list[tuple]:
        """The record keys (``key_fields`` values) one sample and method should produce."""
        return [(method, sample_id)]

    # -- command line ----------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The benchmark's own options (the runner adds --out, --methods, --option, ...)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> Benchmark:
        raise NotImplementedError(f"{cls.__name__} has no command line")

    def print_summary(self, summary: Mapping[str, Any]) -> None:
        print(json.dumps(summary.get("results", {}), indent=1))

    # -- file names --------------------------------------------------------------------------
    @property
    def results_file(self) -> str:
        return f"{self.name}.jsonl"

    @property
    def summary_file(self) -> str:
        return f"{self.name}_summary.json"

    def report_files(self) -> tuple[str, ...]:
        """Files ``write_reports`` writes (moved aside by ``--restart``)."""
        return ()

    def output_files(self) -> tuple[str, ...]:
        return (self.results_file, f"{self.name}.rank*.jsonl", self.summary_file, *self.report_files())


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: ``relprop eval <cls.name with dashes>`` runs ``cls``."""
    BENCHMARKS[cls.name.replace("_", "-")] = cls
    return cls


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: sample i belongs to rank i % world."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def take(self, samples: Sequence[Any]) -> list[Any]:
        return list(samples[self.rank::self.world])

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank (one list, in rank order) on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def agree(self, error: RelpropError | None) -> None:
        """Raise on every rank if any rank failed (its message, once: ranks other than the
        failing one raise a ``SilentRankError``)."""
        errors = self.gather(None if error is None else (type(error).__name__, str(error), error.exit_code))
        if error is not None:
            raise error
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise SilentRankError(failed[1], failed[2])


class SilentRankError(RunFailure):
    """Another rank failed and reports it; this rank exits with the same code, printing nothing."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def rank_file(folder: Path, name: str, rank: int) -> Path:
    return folder / f"{name}.rank{rank}.jsonl"


def merge_rank_files(store: ResultStore, folder: Path, name: str) -> int:
    """Move the records of every ``<name>.rank*.jsonl`` into ``store`` (durably), then delete
    the rank files; returns how many records were new. A record already stored is not added
    twice, so a merge interrupted between the two steps loses and duplicates nothing."""
    added = 0
    for path in sorted(folder.glob(f"{name}.rank*.jsonl")):
        with ResultStore(path, store.key_fields) as part:
            before = len(store.records)
            store.add(part.records.values())
            added += len(store.records) - before
        path.unlink()
    return added


def method_explain(explainer: Any, method: str, options: Mapping[str, Any]) -> Explain:
    def explain(inputs: Any, target: Any = None) -> Any:
        return explainer.explain(inputs, method=method, target=target, **options)
    return explain


def run_benchmark(
    benchmark: Benchmark,
    explainer: Any,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    restart: bool = False,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``benchmark`` for ``methods`` (plus its ``baselines``) into ``out_dir``;
    returns the summary (on every rank of a distributed run).

    ``options``: per method, keyword options of ``explainer.explain`` (they change the maps,
    so they are part of the run's identity). Results in ``out_dir`` made with other weights,
    data or settings are refused (``RunIdentityError``) unless ``restart`` moves them aside.
    ``shard``: this process's part of the samples (default: from ``torch.distributed``).
    """
    shard = shard or Shard.current()
    rows = [*dict.fromkeys(methods), *benchmark.baselines]
    options = {m: dict(o) for m, o in sorted((options or {}).items()) if o and m in rows}  # those that run
    identity = {**benchmark.identity, **({"method_options": options} if options else {})}
    folder = Path(out_dir)
    failures: list[Failure] = []
    key_fields = ("cfg", *benchmark.key_fields)
    samples = benchmark.samples

    def open_this_run(primary: bool):
        return open_run(folder, benchmark.name, benchmark.model, samples, identity, benchmark.config,
                        benchmark.output_files(), restart, benchmark.provenance, primary=primary)

    with _primary_first(shard, open_this_run) as run, ExitStack() as stack:
        main_path = run.folder / benchmark.results_file
        if shard.primary:
            done = stack.enter_context(ResultStore(main_path, key_fields))
            merge_rank_files(done, run.folder, benchmark.name)  # what a killed distributed run left
            run.check_records(done.records.values())
        shard.barrier()  # rank 0 has merged: the main file now holds every finished record
        if not shard.primary:
            done = stack.enter_context(ResultStore(main_path, key_fields, read_only=True))
        # One process writes the main file; each rank of a distributed run its own file.
        own = done if shard.world == 1 else stack.enter_context(
            ResultStore(rank_file(run.folder, benchmark.name, shard.rank), key_fields))

        def needs(sample: Any, method: str) -> list[tuple]:
            return [k for k in benchmark.keys(sample.id, method) if (run.cfg, *k) not in done]

        mine = pending_samples(shard.take(samples), lambda s: not any(needs(s, m) for m in rows))
        for chunk, loaded in load_batches(mine, benchmark.load, batch_size, failures, progress and shard.primary,
                                          desc=benchmark.name, unit=benchmark.unit):
            batch = benchmark.collate(chunk, loaded)
            for method in rows:
                todo = [needs(s, method) for s in chunk]
                if not any(todo):
                    continue
                if method in benchmark.baselines:
                    records = benchmark.baseline_records(method, batch, todo, failures)
                else:
                    explain = method_explain(explainer, method, options.get(method, {}))
                    records = benchmark.records(explain, method, batch, todo, failures)
                own.add(run.stamp(records))
        if own is not done:
            own.close()
        all_failures = [f for part in shard.gather(failures) for f in part]  # also: every rank is done
        error: RelpropError | None = None
        summary: dict[str, Any] = {}
        if shard.primary:
            try:
                merge_rank_files(done, run.folder, benchmark.name)
                require_results(samples, all_failures, (r["id"] for r in done.records.values()))
                summary = benchmark.summarise(done.records, [s.id for s in samples], rows, run.cfg)
                write_summary(run.folder / benchmark.summary_file, summary, run, len(samples), all_failures)
                benchmark.write_reports(summary, run.folder)
            except RelpropError as failure:
                error = failure
        shard.agree(error)
    return shard.gather(summary)[0] if shard.world > 1 else summary


class _primary_first:
    """``open_run`` on rank 0 (lock, identity checks, restart) before the other ranks compute
    the same ``Run``; a refusal on rank 0 reaches every rank (``Shard.agree``)."""

    def __init__(self, shard: Shard, opener: Callable[[bool], Any]):
        self.shard, self.opener = shard, opener
        self.context: Any = None

    def __enter__(self) -> Run:
        error: RelpropError | None = None
        run = None
        if self.shard.primary:
            try:
                self.context = self.opener(True)
                run = self.context.__enter__()
            except RelpropError as failure:
                error = failure
        self.shard.agree(error)
        if not self.shard.primary:
            self.context = self.opener(False)
            run = self.context.__enter__()
        assert run is not None
        return run

    def __exit__(self, *exc: Any) -> Any:
        return self.context.__exit__(*exc)
