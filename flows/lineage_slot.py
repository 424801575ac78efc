"""One lineage at a time: every flow that builds on the champion holds the one slot of a Prefect
global concurrency limit (`flow.lineage_limit`, default `cmoe-lineage`).

A manual `cmoe run` beside the watcher, two workers of one deployment, or a retirement during an
arrival would otherwise each read the same champion and train competing candidates on it. With the
slot, the second waits, then reads the champion the first one left. The limit is created (one
slot) on first use; an operator may see it, or disable it, with `prefect gcl inspect cmoe-lineage`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


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
    ensure_limit(name)
    # strict: a limit deleted under us must fail loudly, not let two lineages run unguarded
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
