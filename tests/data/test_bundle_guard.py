"""Rehearsal guard: a train split opens only inside its own task's scope, and never for data already learned."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cmoe.data.guard import RehearsalError, training_scope
from cmoe.data.loading import load_split
from cmoe.data.validate import open_bundle


def renamed_copy(bundle: Path, to: Path) -> Path:
    """The same bundle under another task name: other task.yaml, the very same training files."""
    shutil.copytree(bundle, to)
    text = (to / "task.yaml").read_text().replace("name: tiny-color", "name: innocent-new-task")
    (to / "task.yaml").write_text(text)
    return to


def test_a_train_split_opens_inside_its_own_scope_only(bundle: Path, tmp_path: Path) -> None:
    opened = open_bundle(bundle)
    with pytest.raises(RehearsalError, match="train split of task 'tiny-color' may be read only by that task's own"):
        load_split(opened, "train", cache_dir=tmp_path)
    with training_scope(opened, {}):
        assert len(load_split(opened, "train", cache_dir=tmp_path)) == 4
    with pytest.raises(RehearsalError):
        load_split(opened, "train", cache_dir=tmp_path)  # the scope ended with the block


def test_test_splits_open_anywhere(bundle: Path, tmp_path: Path) -> None:
    assert len(load_split(open_bundle(bundle), "test", cache_dir=tmp_path)) == 3


def test_another_bundles_scope_does_not_open_this_train_split(make_bundle, tmp_path: Path) -> None:
    mine, other = open_bundle(make_bundle("mine", n_train=4)), open_bundle(make_bundle("other", n_train=5))
    with training_scope(other, {}), pytest.raises(RehearsalError, match="tiny-color"):
        load_split(mine, "train", cache_dir=tmp_path)


def test_a_renamed_copy_of_learned_data_is_refused_naming_the_earlier_task(bundle: Path, tmp_path: Path) -> None:
    original = open_bundle(bundle)
    copy = open_bundle(renamed_copy(bundle, tmp_path / "copy"))
    assert copy.name == "innocent-new-task" and copy.sha256 != original.sha256
    learned = {original.split_sha256["train"]: "tiny-color"}
    with pytest.raises(RehearsalError) as err, training_scope(copy, learned):
        pytest.fail("the scope must not open")
    assert str(tmp_path / "copy") in str(err.value) and "task 'tiny-color'" in str(err.value)


def test_scopes_nest_and_restore(make_bundle, tmp_path: Path) -> None:
    a, b = open_bundle(make_bundle("a", n_train=4)), open_bundle(make_bundle("b", n_train=5))
    with training_scope(a, {}):
        with training_scope(b, {}), pytest.raises(RehearsalError):
            load_split(a, "train", cache_dir=tmp_path)
        assert len(load_split(a, "train", cache_dir=tmp_path)) == 4
