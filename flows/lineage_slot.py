"""One lineage at a time: every flow that builds on the champion holds the one slot of a Prefect
global concurrency limit (`flow.lineage_limit`, default `cmoe-lineage`).

A manual `cmoe run` beside the watcher, two workers of one deployment, or a retirement during an
arrival would otherwise each read the same champion and train competing candidates on it. With the
slot, the second waits, then reads the champion the first one left. The limit is created (one
slot) on first use; an operator may see it, or disable it, with `prefect gcl inspect cmoe-lineage`.
A holder that is killed keeps it until its lease (300 s) lapses and the server's repossessor frees it.

Without a Prefect server (`PREFECT_API_URL` unset) every `cmoe` command starts its own temporary
API on the SQLite database in the Prefect home, and such an API runs none of the server's services:
a slot whose holder was killed would never be freed, and every later run would wait for ever. There
the slot is a kernel lock on a file beside that database (`<PREFECT_HOME>/lineage-slots/<name>.lock`):
the processes sharing the database share it, and the kernel frees it the moment its holder dies.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

POLL_S = 0.5  # how often a bounded wait for a local slot tries again


def ensure_limit(name: str) -> None:
    """Create the one-slot global concurrency limit `name` unless it exists (its slots left as set)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass


@contextmanager
def lineage_slot(name: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the lineage's slot for the block; wait for it (TimeoutError after `timeout_s`, None = forever)."""
    settings = get_current_settings()
    if settings.api.url is None:
        with file_slot(Path(settings.home) / "lineage-slots" / f"{name}.lock", timeout_s):
            yield
        return
    ensure_limit(name)
    # strict: a limit deleted under us must fail loudly, not let two lineages run unguarded
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


@contextmanager
def file_slot(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive kernel lock (flock) on `path` for the block, freed when the holder dies;
    wait for it (TimeoutError after `timeout_s`, None = forever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # each open is its own lock holder, even within one process
        if timeout_s is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while not _try_lock(handle):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"lineage slot {path} still held after {timeout_s:g} s")
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle: TextIO) -> bool:
    """Take the lock on `handle` if it is free; whether it was."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
