"""Append-only JSONL store of per-sample results, the unit of resumability.

Every batch of records is written as whole lines and fsynced before the run moves on, so an
interrupted run keeps everything it finished; a torn final line (killed mid-write) is dropped
on open. Records are keyed by a tuple of their fields: a rerun skips what is already stored,
a record is never appended twice, and duplicate lines found on open (from a relprop without
the run-folder lock) are removed from the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, TextIO

from ..files import atomic_write_text

log = logging.getLogger(__name__)

Record = dict[str, Any]


class ResultStore:
    """Records of one JSONL file, keyed by ``key_fields``; use as a context manager."""

    def __init__(self, path: str | Path, key_fields: tuple[str, ...], read_only: bool = False):
        self.path = Path(path)
        self.key_fields = key_fields
        self.read_only = read_only  # another process owns the file: read it, never repair or append
        self.records: dict[tuple, Record] = {}
        self._file: Optional[TextIO] = None
        self._recover()

    def key(self, record: Record) -> tuple:
        return tuple(record[f] for f in self.key_fields)

    def __contains__(self, key: tuple) -> bool:
        return key in self.records

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data) and not self.read_only:
            # Cut the torn tail so the next append starts on a fresh line.
            log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run",
                        self.path, len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        lines, duplicates = [], 0
        for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = self.key(record)
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: skipping an unreadable record", self.path, number)
                lines.append(line)  # kept in the file for inspection, never counted
                continue
            if key in self.records:  # the first copy is the one that was there first
                duplicates += 1
                continue
            self.records[key] = record
            lines.append(line)
        if duplicates and not self.read_only:
            log.warning("%s: removing %d duplicate records", self.path, duplicates)
            atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def add(self, records: Iterable[Record]) -> None:
        """Append the records not stored yet and make them durable (flush + fsync) before
        returning."""
        new: dict[tuple, Record] = {}
        for record in records:
            key = self.key(record)
            if key not in self.records:
                new.setdefault(key, record)
        if not new:
            return
        if self.read_only:
            raise ValueError(f"{self.path} is open read-only")
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        # One write of whole lines: an interruption leaves at most a torn last line, dropped on open.
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in new.values()))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.update(new)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
