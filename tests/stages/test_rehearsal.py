"""Rehearsal-free, enforced: while task 2 is probed or expanded, task 1's training split cannot be opened.

A spy replaces the stage's `load_task`: it runs inside the stage exactly where the stage reads its
own data, and from there also tries to read the old task. The test split must open (evaluation
re-tests every task); the train split must raise RehearsalError out of the stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import cmoe.stages.expand as expand_stage
import cmoe.stages.probe as probe_stage
from cmoe.data.guard import RehearsalError
from cmoe.data.loading import load_split
from cmoe.stages.common import load_task

from .conftest import Lineage

STAGES = {
    "probe": (probe_stage, lambda lin, out: probe_stage.run_probe(lin.cfg, lin.bundles[1], lin.state(0), out)),
    "expand": (expand_stage, lambda lin, out: expand_stage.run_expand(lin.cfg, lin.bundles[1], lin.state(0), None, out)),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_old_train_split_is_closed_but_old_test_split_open_while_learning_task_2(
    stage: str, lineage: Lineage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, run = STAGES[stage]
    old = lineage.bundles[0]
    opened: list[str] = []

    def spy(bundle, split, processor, cfg, **kw):
        data = load_task(bundle, split, processor, cfg, **kw)  # the stage's own read still works
        opened.append(f"{split}:{len(load_split(old, 'test', cache_dir=cfg.home / 'cache'))}")
        load_split(old, "train", cache_dir=cfg.home / "cache")  # must raise RehearsalError
        opened.append("old train")
        return data

    monkeypatch.setattr(module, "load_task", spy)
    with pytest.raises(RehearsalError) as err:
        run(lineage, tmp_path / stage)
    assert lineage.names[0] in str(err.value)
    assert f"train data may not be opened while learning task '{lineage.names[1]}'" in str(err.value)
    assert opened == ["train:16"]  # the stage read its task's train split; the old test split opened


def test_outside_a_stage_the_old_train_split_is_readable(lineage: Lineage) -> None:
    assert len(load_split(lineage.bundles[0], "train", cache_dir=lineage.cfg.home / "cache")) == 64
