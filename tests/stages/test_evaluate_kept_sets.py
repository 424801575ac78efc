"""Evaluation reads the lineage's kept evaluation sets, and refuses what it cannot score honestly."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.data.evalsets import EvalSetError, eval_set_of
from cmoe.model.cmoe_layer import cmoe_info
from cmoe.stages.common import StageError, open_lineage
from cmoe.stages.evaluate import evaluate_model, run_evaluate

from .conftest import Lineage


def test_without_history_avg_is_the_mean_of_every_tasks_final_accuracy(lineage: Lineage, tmp_path: Path) -> None:
    report = run_evaluate(lineage.cfg, lineage.state(1), tmp_path, [])
    assert report.tasks == lineage.names and len(report.matrix) == 2
    assert report.matrix[0] == [None, None]  # task 1's accuracy right after it was learned is not known here
    assert report.avg_acc == pytest.approx(sum(report.acc.values()) / 2)
    assert report.bwt is None and report.mft == report.acc[lineage.names[1]]


def test_the_kept_sets_score_as_the_bundles_own_test_splits(lineage: Lineage, tmp_path: Path) -> None:
    model, processor = open_lineage(lineage.cfg, lineage.state(1))
    from_bundles = [eval_set_of(b, cache_dir=tmp_path) for b in lineage.bundles]
    direct = evaluate_model(lineage.cfg, model, processor, from_bundles, tmp_path / "direct", [])
    assert run_evaluate(lineage.cfg, lineage.state(1), tmp_path / "kept", []).acc == direct.acc


def test_a_task_without_a_locator_vae_is_an_error_not_oracle_routing(lineage: Lineage, tmp_path: Path) -> None:
    model, processor = open_lineage(lineage.cfg, lineage.state(1))
    del cmoe_info(model).locator.vaes[lineage.names[1]]
    sets = [eval_set_of(b, cache_dir=tmp_path) for b in lineage.bundles]
    with pytest.raises(StageError, match=f"{lineage.names[1]!r}.* no locator VAE"):
        evaluate_model(lineage.cfg, model, processor, sets, tmp_path, [])


def test_an_evaluation_set_of_a_task_the_state_never_learned_is_refused(lineage: Lineage, tmp_path: Path) -> None:
    model, processor = open_lineage(lineage.cfg, lineage.state(0))
    sets = [eval_set_of(b, cache_dir=tmp_path) for b in lineage.bundles]
    with pytest.raises(StageError, match=f"task '{lineage.names[1]}': this state never learned it"):
        evaluate_model(lineage.cfg, model, processor, sets, tmp_path, [])


def test_a_missing_kept_set_is_reported_naming_its_task(lineage: Lineage, tmp_path: Path) -> None:
    model, processor = open_lineage(lineage.cfg, lineage.state(0))
    info = cmoe_info(model)
    record = info.task_records[lineage.names[0]]
    record["eval_set"] = {**record["eval_set"], "uri": str(tmp_path / "gone.parquet")}
    from cmoe.stages.common import kept_eval_sets

    with pytest.raises(EvalSetError, match=f"task '{lineage.names[0]}' is missing from the store"):
        kept_eval_sets(lineage.cfg, model)
