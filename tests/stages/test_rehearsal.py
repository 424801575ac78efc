"""Rehearsal-free, enforced: while task 2 is probed or expanded, task 1's training data cannot be read,
and a renamed copy of task 1's bundle is refused before anything is trained.

A spy wraps the stages' `load_split`: it runs exactly where the stage reads its own training data,
and from there also tries to read the old task's train split, which must raise RehearsalError.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import cmoe.stages.common as common
import cmoe.stages.expand as expand_stage
import cmoe.stages.probe as probe_stage
from cmoe.data.guard import RehearsalError
from cmoe.data.loading import load_split
from cmoe.data.validate import open_bundle

from .conftest import Lineage

STAGES = {
    "probe": lambda lin, bundle, out: probe_stage.run_probe(lin.cfg, bundle, lin.state(0), out),
    "expand": lambda lin, bundle, out: expand_stage.run_expand(lin.cfg, bundle, lin.state(0), None, out),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_old_train_split_is_closed_while_learning_task_2(
    stage: str, lineage: Lineage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = lineage.bundles[0]
    opened: list[str] = []

    def spy(bundle, split, *, cache_dir):
        rows = load_split(bundle, split, cache_dir=cache_dir)  # the stage's own read still works
        opened.append(f"{bundle.name}:{split}:{len(rows)}")
        load_split(old, "train", cache_dir=cache_dir)  # must raise RehearsalError
        opened.append("old train")
        return rows

    monkeypatch.setattr(common, "load_split", spy)
    with pytest.raises(RehearsalError, match=f"train split of task '{lineage.names[0]}' may be read only"):
        STAGES[stage](lineage, lineage.bundles[1], tmp_path / stage)
    assert opened == [f"{lineage.names[1]}:train:64"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_renamed_copy_of_task_1_is_refused_before_training(stage: str, lineage: Lineage, tmp_path: Path) -> None:
    copy = tmp_path / "renamed"
    shutil.copytree(lineage.bundles[0].root, copy)
    text = (copy / "task.yaml").read_text().replace(f"name: {lineage.names[0]}", "name: brand-new-task")
    (copy / "task.yaml").write_text(text)
    renamed = open_bundle(copy)
    assert renamed.name == "brand-new-task"
    with pytest.raises(RehearsalError, match=f"already learned as task '{lineage.names[0]}' by this lineage"):
        STAGES[stage](lineage, renamed, tmp_path / stage)
    assert not (tmp_path / stage / "checkpoints").exists() and not (tmp_path / stage / "state").exists()


def test_outside_its_stages_a_train_split_is_closed(lineage: Lineage) -> None:
    with pytest.raises(RehearsalError):
        load_split(lineage.bundles[0], "train", cache_dir=lineage.cfg.home / "cache")
