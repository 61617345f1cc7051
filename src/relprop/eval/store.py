"""Append-only JSONL store of per-sample results, the unit of resumability.

Every record is written as one line and fsynced before the run moves on, so an interrupted
run keeps everything it finished; a torn final line (killed mid-write) is dropped on open.
Records are keyed by a tuple of their fields, so a rerun skips what is already stored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Record = dict[str, Any]


class ResultStore:
    """Records of one JSONL file, keyed by ``key_fields``; use as a context manager."""

    def __init__(self, path: str | Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self.records: dict[tuple, Record] = {}
        self._file = None
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
        if len(complete) < len(data):
            # Cut the torn tail so the next append starts on a fresh line.
            log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run",
                        self.path, len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records[self.key(record)] = record
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: skipping an unreadable record", self.path, number)

    def add(self, records: Iterable[Record]) -> None:
        """Append records and make them durable (flush + fsync) before returning."""
        records = list(records)
        if not records:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        for record in records:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        for record in records:
            self.records[self.key(record)] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
