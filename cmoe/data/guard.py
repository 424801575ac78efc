"""Rehearsal guard: while learning a task, the training data of earlier tasks stays closed.

cmoe is rehearsal-free: experts for task t must be trained on task t alone. The guard makes that
a checked property instead of a convention: inside `training_scope(...)`, `load_split(..., "train")`
of an earlier task raises RehearsalError. Test splits stay readable (evaluation re-tests every task).
The state is a ContextVar, so concurrent threads or asyncio tasks each have their own scope.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

GUARDED_SPLITS = frozenset({"train"})


class RehearsalError(PermissionError):
    """An earlier task's training data was requested while learning another task."""


@dataclass(frozen=True)
class _Scope:
    task: str
    history: frozenset[str]


_scope: ContextVar[_Scope | None] = ContextVar("cmoe_training_scope", default=None)


@contextmanager
def training_scope(task: str, history: Iterable[str]) -> Iterator[None]:
    """Within this block, `task` is being learned and the train splits of `history` may not be opened."""
    token = _scope.set(_Scope(task, frozenset(history) - {task}))
    try:
        yield
    finally:
        _scope.reset(token)


def check_split_access(task: str, split: str) -> None:
    """Raise RehearsalError if the current training scope forbids reading `split` of `task`."""
    scope = _scope.get()
    if scope is not None and split in GUARDED_SPLITS and task in scope.history:
        raise RehearsalError(
            f"task {task!r}'s {split} data may not be opened while learning task {scope.task!r}: "
            "cmoe is rehearsal-free"
        )
