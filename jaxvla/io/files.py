"""Writing result files atomically: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same directory, so the rename is atomic; the
    directory is created); on success it replaces ``path``, on an exception it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> str:
    """Writes ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: str | os.PathLike, value: Any) -> str:
    """Writes ``value`` as indented JSON atomically (numpy scalars and other numbers through
    ``float``); returns ``path``."""
    return write_text(path, json.dumps(value, indent=1, default=float))
