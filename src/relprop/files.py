"""Output files: one check for output folders and one atomic writer, so a crash never leaves a
half-written file under its final name and a folder argument that names a file is refused."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO, Union

from .errors import UsageError

PathLike = Union[str, os.PathLike]


def output_dir(path: PathLike, option: str = "--out") -> Path:
    """``path`` as a folder ready for writing (created if missing); a `UsageError` naming
    ``option`` if it is an existing file or cannot be created."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a file, not a folder; give a folder "
                         "(it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the {option} folder {str(path)!r}: {error.strerror or error}") from None
    return folder


def atomic_write(path: PathLike, write: Callable[[IO], object], binary: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with (open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8")) as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), binary=False)
