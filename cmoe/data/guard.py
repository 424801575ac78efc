"""Rehearsal guard: a train split is read only by its own task's stages, and never twice.

cmoe is rehearsal-free: experts for task t are trained on task t alone, and the lineage never keeps
or re-reads old training data. The guard makes that a checked property of the data layer:

- `load_split(bundle, "train")` works only inside `training_scope(bundle, learned)` for that very
  bundle; anywhere else (evaluation, a stage of another task) it raises RehearsalError.
- `training_scope` refuses a bundle whose train split's *content hash* is already in the lineage
  (`learned`: train-split sha256 -> task), so a renamed copy of an old task's bundle (other name,
  other task.yaml, same training files) is refused before anything is trained.

The scope is a ContextVar, so concurrent threads or asyncio tasks each have their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # validate imports loading's neighbours; only the type is needed here
    from cmoe.data.validate import ValidatedBundle

TRAIN = "train"


class RehearsalError(PermissionError):
    """Training data was requested outside its own task's stages, or an old task's data came back."""


_scope: ContextVar[str | None] = ContextVar("cmoe_training_scope", default=None)  # train-split sha256


def check_not_learned(bundle: ValidatedBundle, learned: Mapping[str, str]) -> None:
    """Raise RehearsalError if `bundle`'s training data is already in the lineage (`learned`:
    train-split sha256 -> task), whatever the bundle is called."""
    sha = bundle.split_sha256[TRAIN]
    if (earlier := learned.get(sha)) is not None:
        raise RehearsalError(
            f"{bundle.uri}: its training data (train split sha256 {sha[:16]}…) was already learned as task "
            f"{earlier!r} by this lineage; cmoe is rehearsal-free and learns a task's data once "
            f"(this bundle is named {bundle.name!r})")


@contextmanager
def training_scope(bundle: ValidatedBundle, learned: Mapping[str, str]) -> Iterator[None]:
    """Within this block `bundle`'s train split may be read; refused if the lineage learned it already."""
    check_not_learned(bundle, learned)
    token = _scope.set(bundle.split_sha256[TRAIN])
    try:
        yield
    finally:
        _scope.reset(token)


def check_split_access(bundle: ValidatedBundle, split: str) -> None:
    """Raise RehearsalError unless `split` of `bundle` may be read here (test splits always may)."""
    if split == TRAIN and _scope.get() != bundle.split_sha256[TRAIN]:
        raise RehearsalError(
            f"{bundle.uri}: the train split of task {bundle.name!r} may be read only by that task's own "
            "probe and expansion (cmoe is rehearsal-free)")
