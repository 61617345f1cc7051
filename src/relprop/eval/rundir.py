"""One output folder holds one run: a lock keeps a second process out, and a run record says
what its results depend on so that a rerun resumes only what the same run would compute.

* Lock: ``fcntl.flock`` on ``OUT/.relprop-eval.lock`` (holding the owner's pid), for as long
  as a benchmark runs; a second process is refused at once (``RunFailure``).
* Run record ``OUT/<benchmark>_run.json``: a content fingerprint of the model's parameters
  and buffers (``model_fingerprint``) and the settings. Each result record also carries the
  fingerprint of its sample's data (``source_fingerprints``). Results made with other weights,
  settings or data are refused (``RunIdentityError``), never mixed in; so are results that
  have no run record (written before relprop kept one).
* ``restart=True`` (``--restart``) moves the benchmark's earlier results into
  ``OUT/previous-<time>/`` and starts over.

Paths are not part of the identity: a model or dataset that is moved keeps its results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from ..errors import RunFailure, RunIdentityError
from ..files import atomic_write_text, output_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected from each other
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".relprop-eval.lock"
RECORD_FORMAT = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short SHA-256 of every parameter and buffer (name, dtype, shape and bytes), the same on
    any device: what the model computes, whatever folder it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(value.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def source_fingerprints(samples: Sequence[Any]) -> dict[str, str]:
    """Sample id -> short hash of its label and of the name, size and modification time of
    each file it is read from (``sample.sources``).

    Size + mtime, not a content hash: stat-ing the 50,000 ImageNet validation images takes
    about a second, hashing their 6.4 GB minutes. Rewriting a file changes its mtime; a copy
    that keeps both (``cp -p``, ``rsync -a``, unpacking the same archive) is the same data.
    """
    stats: dict[Path, list[int] | None] = {}  # files shared by many samples (a .mat, idx files) stat once

    def stat(path: Path) -> list[int] | None:
        if path not in stats:
            try:
                st = os.stat(path)
                stats[path] = [st.st_size, st.st_mtime_ns]
            except OSError:  # missing: the sample fails when loaded and is reported there
                stats[path] = None
        return stats[path]

    fingerprints = {}
    for sample in samples:
        files = [[Path(p).name, stat(Path(p))] for p in getattr(sample, "sources", ())]
        blob = json.dumps([getattr(sample, "label", None), files], separators=(",", ":"))
        fingerprints[sample.id] = hashlib.sha1(blob.encode()).hexdigest()[:12]
    return fingerprints


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock, or raise ``RunFailure`` naming the process that holds it."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            raise RunFailure(f"another relprop eval is using {folder} (pid {pid}); wait for it or use "
                             "another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting process)


def _holder_pid(fd: int) -> str:
    """The pid the lock holder wrote; it writes it just after taking the lock, so a process that
    meets the lock in that instant waits a moment for it rather than report no pid."""
    for _ in range(40):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.05)
    return "unknown"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{key} {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


@dataclass
class Run:
    """A benchmark run in its locked folder: the settings its records are made under and the
    data fingerprint of each sample."""

    folder: Path
    benchmark: str
    settings: dict[str, Any]  # the identity, the benchmark's config and "model_weights"
    cfg: str  # short id of ``settings``, stored in every record
    sources: dict[str, str] = field(repr=False)  # sample id -> source_fingerprints value
    provenance: dict[str, Any] = field(default_factory=dict)

    def refuse(self, which: str) -> RunIdentityError:
        return RunIdentityError(
            f"{self.folder} holds {self.benchmark} results {which}; resuming would mix them with this run's. "
            f"Use another --out, or --restart to move them into {self.folder / 'previous-<time>'} and start over")

    def check_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Refuse if stored records of this run's samples were made from other data."""
        changed = sorted({r["id"] for r in records
                          if r["id"] in self.sources and r.get("src") != self.sources[r["id"]]})
        if changed:
            raise self.refuse(f"made from other data: the data differ for {len(changed)} samples since their results "
                              f"were stored (e.g. {', '.join(map(repr, changed[:3]))}: label, file size or "
                              "modification time)")

    def stamp(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records tagged with the run's settings id and their sample's data fingerprint."""
        return [{"cfg": self.cfg, **r, "src": self.sources[r["id"]]} for r in records]


def settings_id(settings: Mapping[str, Any]) -> str:
    """Short stable hash of the settings that determine a record's value."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


@contextmanager
def open_run(out_dir: str | Path, benchmark: str, model: torch.nn.Module, samples: Sequence[Any],
             identity: Mapping[str, Any] | None, config: Any, result_files: Sequence[str], restart: bool = False,
             provenance: Mapping[str, Any] | None = None, primary: bool = True) -> Iterator[Run]:
    """Lock ``out_dir`` and check (or write) its run record for ``benchmark``.

    ``identity`` holds the settings beyond ``config.settings()`` that change a result (data
    kind, labels, method options); ``provenance`` what is only noted (paths). Earlier results
    (``result_files``, glob patterns) made with other model weights or settings, or with no run
    record, are refused unless ``restart``, which moves them into ``out_dir/previous-<time>/``.

    ``primary=False`` (the other ranks of a distributed run, once rank 0 holds the lock and
    has checked the folder) only computes the same ``Run``: no lock, no check, no writes.
    """
    folder = output_dir(out_dir)
    # As stored (tuples become lists), so a rerun compares equal to the record it reads back.
    settings = json.loads(json.dumps({**(identity or {}), **config.settings()}))
    if not primary:
        full = {**settings, "model_weights": model_fingerprint(model)}
        yield Run(folder, benchmark, full, settings_id(full), source_fingerprints(samples), dict(provenance or {}))
        return
    with folder_lock(folder):
        weights = model_fingerprint(model)
        record_path = folder / f"{benchmark}_run.json"
        existing = sorted(path for pattern in result_files for path in folder.glob(pattern)
                          if path.is_file() and path.stat().st_size > 0)
        if existing and restart:
            _move_aside(folder, [*existing, record_path], benchmark)
            existing = []
        full = {**settings, "model_weights": weights}
        run = Run(folder, benchmark, full, settings_id(full), source_fingerprints(samples), dict(provenance or {}))
        if existing:
            _check_record(run, record_path, weights, settings)
        else:  # nothing to protect: (re)start this folder's run record
            atomic_write_text(record_path, json.dumps({
                "benchmark": benchmark, "format": RECORD_FORMAT, "model_weights": weights, "settings": settings,
                "settings_id": run.cfg, "provenance": run.provenance,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
        yield run


def _check_record(run: Run, path: Path, weights: str, settings: Mapping[str, Any]) -> None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored_weights, stored_settings = stored["model_weights"], stored["settings"]
    except FileNotFoundError:
        raise run.refuse(f"without a run record ({path.name}; written by a relprop from before run records), so "
                         "the model weights, data and settings that made them are unknown") from None
    except (ValueError, KeyError, TypeError):
        raise run.refuse(f"whose run record {path.name} is unreadable") from None
    if stored_weights != weights:
        raise run.refuse(f"of another model: the model weights differ (stored fingerprint {stored_weights}, "
                         f"this model {weights})")
    differences = _differences(stored_settings, settings)
    if differences:
        raise run.refuse(f"made with other settings: the settings differ ({'; '.join(differences[:4])})")


def _move_aside(folder: Path, paths: Sequence[Path], benchmark: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = folder / f"previous-{stamp}", 1
    while target.exists():
        n += 1
        target = folder / f"previous-{stamp}-{n}"
    target.mkdir()
    for path in paths:
        if path.exists():
            os.replace(path, target / path.name)
    log.warning("moved the earlier %s results of %s into %s; starting over", benchmark, folder, target)
