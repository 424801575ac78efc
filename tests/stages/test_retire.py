"""Retire stage on the session's two-task lineage: the retired task leaves routing, locator, evaluation
and the parameter count; the other task answers exactly as before; the new state replays exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .conftest import Lineage


@dataclass
class Retired:
    result: object  # RetireResult
    before: object  # EvalReport of the two-task state
    after: object  # EvalReport of the retired state


@pytest.fixture(scope="module")
def evaluated(lineage: Lineage, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The two-task state's evaluation (what the gate compares a retirement against)."""
    from cmoe.stages.evaluate import run_evaluate

    return run_evaluate(lineage.cfg, lineage.state(1), tmp_path_factory.mktemp("eval-both"), [])


def _retire(lineage: Lineage, evaluated: object, i: int, tmp: Path) -> Retired:
    from cmoe.stages.evaluate import run_evaluate
    from cmoe.stages.retire import run_retire

    result = run_retire(lineage.cfg, lineage.state(1), lineage.names[i], tmp / "retire")
    return Retired(result, evaluated, run_evaluate(lineage.cfg, Path(result.state_dir), tmp / "eval", []))


@pytest.fixture(scope="module")
def first(lineage: Lineage, evaluated: object, tmp_path_factory: pytest.TempPathFactory) -> Retired:
    """Task 1 retired: task 2's router covers its experts."""
    return _retire(lineage, evaluated, 0, tmp_path_factory.mktemp("retire-first"))


@pytest.fixture(scope="module")
def second(lineage: Lineage, evaluated: object, tmp_path_factory: pytest.TempPathFactory) -> Retired:
    """Task 2 retired: no later router covers its experts."""
    return _retire(lineage, evaluated, 1, tmp_path_factory.mktemp("retire-second"))


@pytest.mark.parametrize("which", ["first", "second"])
def test_the_retired_task_is_gone_from_routing_locator_records_and_evaluation(
        which: str, lineage: Lineage, request: pytest.FixtureRequest) -> None:
    from cmoe.model.cmoe_layer import cmoe_info, cmoe_layers
    from cmoe.model.state import load_state, read_manifest

    retired: Retired = request.getfixturevalue(which)
    gone, left = lineage.names if which == "first" else lineage.names[::-1]
    state = Path(retired.result.state_dir)
    model = load_state(state)
    info = cmoe_info(model)
    assert info.tasks == [left] == retired.result.remaining and info.locator.tasks == [left]
    assert list(info.task_records) == [left] and list(read_manifest(state)["task_records"]) == [left]
    assert not (state / "tasks" / gone).exists()
    assert all(len(layer.routers) == 1 and gone not in layer.expert_origin for layer in cmoe_layers(model).values())
    assert retired.after.tasks == [left] and gone not in retired.after.acc


def test_experts_the_later_router_picks_are_kept_for_it_the_others_dropped(first: Retired, lineage: Lineage) -> None:
    from cmoe.model.cmoe_layer import cmoe_layers
    from cmoe.model.state import load_state

    result, e0 = first.result, lineage.cfg.moe.initial_experts
    assert result.heir == lineage.names[1]
    assert [(x["layer"], x["index"]) for x in result.experts] == [(0, e0), (0, e0 + 1)]  # task 1 grew 2 in layer 0
    assert all(x["kept"] == (x["uses"][lineage.names[1]] > 0) for x in result.experts)
    assert result.experts_kept == sum(x["kept"] for x in result.experts) >= 1  # this lineage exercises keeping
    origins = cmoe_layers(load_state(Path(result.state_dir)))[0].expert_origin
    assert origins == ["base"] * e0 + [lineage.names[1]] * result.experts_kept


def test_retiring_the_last_task_drops_all_its_experts_and_gives_back_the_state_before_it(
        second: Retired, lineage: Lineage) -> None:
    from cmoe.model.state import load_state

    assert second.result.heir is None and second.result.experts_kept == 0 and second.result.experts_dropped == 1
    got, want = load_state(Path(second.result.state_dir)).state_dict(), load_state(lineage.state(0)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("which", ["first", "second"])
def test_the_other_tasks_accuracy_is_unchanged(which: str, lineage: Lineage, request: pytest.FixtureRequest) -> None:
    retired: Retired = request.getfixturevalue(which)
    left = lineage.names[1] if which == "first" else lineage.names[0]
    assert retired.after.oracle_acc == {left: retired.before.oracle_acc[left]}
    # one task left: the locator can only pick it, so it answers as its own router does
    assert retired.after.acc == retired.after.oracle_acc and retired.after.locator_acc == 100.0


@pytest.mark.parametrize("which", ["first", "second"])
def test_parameter_count_loses_exactly_what_the_task_owned(which: str, lineage: Lineage,
                                                          request: pytest.FixtureRequest) -> None:
    from cmoe.model.cmoe_layer import cmoe_layers
    from cmoe.model.params import count_params
    from cmoe.model.state import load_state

    retired: Retired = request.getfixturevalue(which)
    result = retired.result
    before = load_state(lineage.state(1))
    t = lineage.names.index(result.task)
    layers = cmoe_layers(before)
    expert = sum(p.numel() for p in layers[0].experts[0].parameters())
    owned = (sum(layer.routers[t].numel() for layer in layers.values())
             + sum(p.numel() for p in before.cmoe.locator.vaes[result.task].parameters())
             + result.experts_dropped * (expert + (layers[0].hidden_size if t == 0 else 0)))  # + task 2's router rows
    assert result.params_before == count_params(before).total == retired.before.params_total
    assert result.params_after == result.params_before - owned == retired.after.params_total
    assert result.params_added == -owned


def test_the_saved_state_replays_the_retired_model_exactly(first: Retired, lineage: Lineage) -> None:
    from cmoe.model.cmoe_layer import retire_task
    from cmoe.model.state import load_state

    model = load_state(lineage.state(1))
    retire_task(model, lineage.names[0], {(x["layer"], x["index"]) for x in first.result.experts if not x["kept"]})
    got, want = load_state(Path(first.result.state_dir)).state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_lineage_of_one_task_or_an_unknown_task_is_refused(lineage: Lineage, tmp_path: Path) -> None:
    from cmoe.stages.common import StageError
    from cmoe.stages.retire import run_retire

    with pytest.raises(StageError, match="only task"):
        run_retire(lineage.cfg, lineage.state(0), lineage.names[0], tmp_path / "one")
    with pytest.raises(StageError, match="'nope' is not in this model"):
        run_retire(lineage.cfg, lineage.state(1), "nope", tmp_path / "unknown")
    assert not (tmp_path / "one").exists() and not (tmp_path / "unknown").exists()


def test_the_gate_checks_every_remaining_task_against_the_champion_and_none_as_new(
        first: Retired, lineage: Lineage) -> None:
    from cmoe.config import GateConfig
    from cmoe.stages.gate import decide

    left = lineage.names[1]
    strict = GateConfig(min_new_task_acc=100.0, max_forgetting=0.0, max_avg_drop=0.0, min_locator_acc=0.0)
    champion = dict(first.before.acc)
    decision = decide(strict, first.after, champion, first.result.params_added, learned=False)
    assert decision.outcome == "approve" and decision.metrics["new_task_acc"] is None
    champion[left] = first.after.acc[left] + 1.0  # the champion did better on the remaining task
    decision = decide(strict, first.after, champion, first.result.params_added, learned=False)
    assert decision.outcome == "reject" and decision.reasons[0] == f"old task {left}: dropped 1.0 points > 0.0"
