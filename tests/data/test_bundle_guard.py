"""Rehearsal guard: an earlier task's train split stays closed while learning a new task."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.data.guard import RehearsalError, check_split_access, training_scope
from cmoe.data.loading import load_split


def test_old_train_split_is_refused_old_test_split_allowed(bundle: Path, tmp_path: Path) -> None:
    with training_scope("next-task", history=["tiny-color"]):
        with pytest.raises(RehearsalError, match="task 'tiny-color'.*learning task 'next-task'.*rehearsal-free"):
            load_split(bundle, "train", cache_dir=tmp_path)
        assert len(load_split(bundle, "test", cache_dir=tmp_path)) == 3


def test_current_task_and_code_outside_a_scope_may_read_train() -> None:
    with training_scope("tiny-color", history=["older", "tiny-color"]):
        check_split_access("tiny-color", "train")
    check_split_access("older", "train")  # the scope ended with the block


def test_scopes_nest_and_restore() -> None:
    with training_scope("b", history=["a"]):
        with training_scope("c", history=["a", "b"]):
            with pytest.raises(RehearsalError):
                check_split_access("b", "train")
        check_split_access("b", "train")
