"""Atomic writes: a reader sees the old file or folder, or the complete new one, never a half-written one;
and the sha256 of a file, read in chunks (state deltas, checkpoints, shipped code).

Both write into a temporary sibling (same filesystem, so the final rename is atomic on POSIX) whose
name starts with a dot: folder scanners (the inbox watcher, caches) pass over it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex sha256 of file `path`, read 1 MiB at a time (checkpoints and deltas can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to file `path` (parents created) through a temporary sibling and a rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to file `path` (parents created) through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of folder `path`; on success it replaces `path` whole, on failure it goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            # Two renames: `path` is missing only between them, and never half-written.
            old = _sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside `path`, unique per call (concurrent writers never share a temporary)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")
