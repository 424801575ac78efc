"""Evaluation: every task re-tested with locator and oracle routing, the matrix row, metrics and files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from cmoe.stages.evaluate import EvalReport, run_evaluate

from .conftest import Lineage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TEST = 16
EARLIER = 50.0  # a made-up accuracy of task 1 right after it was learned


@pytest.fixture(scope="module")
def report(lineage: Lineage, tmp_path_factory: pytest.TempPathFactory) -> EvalReport:
    """The two-task state evaluated on both tasks, with task 1's earlier row as history."""
    history = [{lineage.names[0]: EARLIER}]
    return run_evaluate(lineage.cfg, lineage.state(1), tmp_path_factory.mktemp("eval"), history)


def test_every_task_so_far_gets_an_accuracy_with_locator_and_oracle_routing(report: EvalReport, lineage: Lineage) -> None:
    assert report.tasks == lineage.names
    for accs in (report.acc, report.oracle_acc):
        assert list(accs) == lineage.names
        assert all(0.0 <= a <= 100.0 for a in accs.values())


def test_locator_accuracy_and_confusion_count_every_test_sample(report: EvalReport) -> None:
    assert len(report.confusion) == 2 and all(len(row) == 2 for row in report.confusion)
    assert [sum(row) for row in report.confusion] == [N_TEST, N_TEST]
    diagonal = report.confusion[0][0] + report.confusion[1][1]
    assert report.locator_acc == pytest.approx(100 * diagonal / (2 * N_TEST))


def test_the_matrix_is_lower_triangular_with_the_history_as_earlier_rows(report: EvalReport, lineage: Lineage) -> None:
    a, b = lineage.names
    assert report.matrix == [[EARLIER, None], [report.acc[a], report.acc[b]]]
    assert report.bwt == pytest.approx(report.acc[a] - EARLIER)
    assert report.forgetting == pytest.approx(EARLIER - report.acc[a])
    assert report.avg_acc == pytest.approx((report.acc[a] + report.acc[b]) / 2)


def test_params_added_are_reported_per_task_in_order(report: EvalReport, lineage: Lineage) -> None:
    assert len(report.params_added) == 2
    # counted by the evaluation: new experts + the task's router (+ its locator VAE)
    assert all(added > grown for added, grown in zip(report.params_added, (e.params_added for e in lineage.expands)))
    assert report.params_total > report.params_active > 0


def test_report_json_and_heatmap_are_written(report: EvalReport) -> None:
    assert json.loads(Path(report.report_json).read_text()) == json.loads(json.dumps(asdict(report)))
    assert Path(report.heatmap_png).read_bytes()[:8] == PNG_MAGIC

