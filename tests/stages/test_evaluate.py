"""Evaluation: every task re-tested with locator and oracle routing, the matrix row, metrics and files.

The tiny lineage answers (almost) nothing right, so accuracies of 0 would prove little. The tests
grade the lineage's kept evaluation sets with answer keys built from the model's own located
answers: a chosen set of rows accepts exactly what the model says there, every other row accepts
only an answer it never gives. The accuracies are then known before evaluating.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest

from cmoe.data.evalsets import EvalSet
from cmoe.model.inference import Decoded, decode
from cmoe.stages.common import encode_rows, kept_eval_sets, open_lineage
from cmoe.stages.evaluate import EvalReport, evaluate_model
from cmoe.stages.metrics import normalize

from .conftest import Lineage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TEST = 16
RIGHT = ({0, 4, 8, 12}, set(range(0, N_TEST, 2)))  # per task: rows whose key is the model's own answer
NEVER = "no such answer"  # the key of every other row
EARLIER = 50.0  # the lineage's row after task 1: task 1's accuracy right after it was learned


@dataclass
class Graded:
    report: EvalReport
    located: dict[str, Decoded]  # per task, the answers and located tasks under locator routing
    oracle: dict[str, Decoded]  # per task, the answers under the task's own router
    keys: dict[str, list[list[str]]]  # per task, the accepted answers of every row


def evaluate(lineage: Lineage, sets: list[EvalSet], out: Path, history: list[dict[str, float]]) -> EvalReport:
    """The evaluation stage on the lineage's two-task state (the one call site in this file)."""
    model, processor = open_lineage(lineage.cfg, lineage.state(1))
    return evaluate_model(lineage.cfg, model, processor, sets, out, history)


@pytest.fixture(scope="module")
def graded(lineage: Lineage, tmp_path_factory: pytest.TempPathFactory) -> Graded:
    """Both tasks' kept sets with answer keys from the model's located answers (RIGHT), evaluated
    with task 1's earlier row as history."""
    cfg = lineage.cfg
    model, processor = open_lineage(cfg, lineage.state(1))
    sets, located, oracle, keys = [], {}, {}, {}
    for kept, right in zip(kept_eval_sets(cfg, model), RIGHT):
        name = kept.spec.name
        encoded = encode_rows(kept.spec, kept.rows, processor, with_answers=False).encoded
        # decoded as the evaluation decodes (same batches), so the answers are the ones it scores
        ask = {"batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens}
        located[name] = decode(model, processor, encoded, mode="locator", **ask)
        oracle[name] = decode(model, processor, encoded, mode="oracle", task=name, **ask)
        assert len(encoded) == N_TEST and normalize(NEVER) not in map(normalize, located[name].answers)
        keys[name] = [[a] if i in right else [NEVER] for i, a in enumerate(located[name].answers)]
        sets.append(replace(kept, rows=kept.rows.remove_columns("answers").add_column("answers", keys[name])))
    history = [{lineage.names[0]: EARLIER}]
    return Graded(evaluate(lineage, sets, tmp_path_factory.mktemp("eval"), history), located, oracle, keys)


def test_accuracy_is_the_percentage_of_rows_whose_answer_the_key_accepts(graded: Graded, lineage: Lineage) -> None:
    a, b = lineage.names
    assert graded.report.tasks == [a, b]
    assert graded.report.acc == {a: 25.0, b: 50.0}  # 4 and 8 of 16 rows
    # under oracle routing a row counts where the task's own router says what the key accepts
    oracle = {t: 100 * sum(normalize(ans) in map(normalize, key) for ans, key in zip(graded.oracle[t].answers,
                                                                                    graded.keys[t])) / N_TEST
              for t in (a, b)}
    assert graded.report.oracle_acc == oracle


def test_locator_accuracy_and_confusion_count_where_each_sample_was_routed(graded: Graded, lineage: Lineage) -> None:
    names = lineage.names
    confusion = [[graded.located[true].located.count(got) for got in names] for true in names]
    assert graded.report.confusion == confusion
    assert [sum(row) for row in confusion] == [N_TEST, N_TEST]
    assert graded.report.locator_acc == 100 * (confusion[0][0] + confusion[1][1]) / (2 * N_TEST)


def test_this_steps_row_follows_the_history_and_the_metrics_are_of_that_matrix(graded: Graded) -> None:
    report = graded.report
    assert report.matrix == [[EARLIER, None], [25.0, 50.0]]
    assert report.avg_acc == 37.5  # (25 + 50) / 2
    assert report.mft == 50.0  # (50 + 50) / 2: each task right after it was learned
    assert report.bwt == -25.0  # task 1: 25 now - 50 then
    assert report.forgetting == 25.0
    assert report.maa == 43.75  # (50 + 37.5) / 2


def test_params_added_are_reported_per_task_in_order(graded: Graded, lineage: Lineage) -> None:
    report = graded.report
    assert len(report.params_added) == 2
    # counted by the evaluation: new experts + the task's router (+ its locator VAE)
    assert all(added > grown for added, grown in zip(report.params_added, (e.params_added for e in lineage.expands)))
    assert report.params_total > report.params_active > 0


def test_report_json_and_heatmap_are_written(graded: Graded) -> None:
    report = graded.report
    assert json.loads(Path(report.report_json).read_text()) == json.loads(json.dumps(asdict(report)))
    assert Path(report.heatmap_png).read_bytes()[:8] == PNG_MAGIC
