"""Plumbing shared by the benchmark runs: batched loading that reports unreadable samples
instead of dropping them, batched model predictions, and the summary (the run's folder, lock
and identity are ``rundir``'s)."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..files import atomic_write_text
from .rundir import Run

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
) -> Iterator[tuple[list[S], list[T]]]:
    """Yield (samples, loaded) batches of up to ``batch_size`` readable samples.

    A sample whose ``load`` raises is logged and appended to ``failures``, never dropped
    silently; the run continues with the others.
    """
    batch: list[S] = []
    loaded: list[T] = []
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress) as bar:
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
