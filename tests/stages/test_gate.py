"""The gate policy on hand-made evaluations: approve, reject on each threshold alone, or send to review."""

from __future__ import annotations

import pytest

from cmoe.config import GateConfig
from cmoe.stages.evaluate import EvalReport
from cmoe.stages.gate import decide

POLICY = GateConfig(min_new_task_acc=50.0, max_forgetting=5.0, max_avg_drop=2.0, max_params_added=1000,
                    min_locator_acc=90.0)
CHAMPION = {"a": 80.0, "b": 70.0}  # the champion's recorded accuracies on the old tasks


def report(a: float = 80.0, b: float = 70.0, new: float = 60.0, locator_acc: float | None = 95.0) -> EvalReport:
    """A candidate that learned tasks a, b, then c (new); only the fields the gate reads matter."""
    acc = {"a": a, "b": b, "c": new}
    return EvalReport(
        tasks=["a", "b", "c"], acc=acc, oracle_acc=dict(acc), locator_acc=locator_acc, confusion=None,
        matrix=[[a, None, None], [a, b, None], [a, b, new]], avg_acc=(a + b + new) / 3, mft=None, bwt=None, forgetting=None,
        maa=None, params_total=10_000, params_active=5_000, params_added=[0, 0, 0], eval_samples_per_s=1.0,
        report_json="", heatmap_png="",
    )


def test_a_candidate_within_every_threshold_is_approved() -> None:
    decision = decide(POLICY, report(a=79.0, b=71.0), CHAMPION, params_added=1000)
    assert decision.outcome == "approve"
    assert decision.metrics["new_task_acc"] == 60.0
    assert decision.metrics["avg_drop"] == pytest.approx(0.0)
    assert decision.metrics["max_drop"] == pytest.approx(1.0)


@pytest.mark.parametrize("candidate, params_added, reason", [
    (report(new=49.9), 0, "new task c: accuracy 49.9 < 50.0"),
    (report(a=74.0, b=76.0), 0, "old task a: dropped 6.0 points > 5.0"),  # average drop 0
    (report(a=77.0, b=67.0), 0, "average drop on old tasks 3.0 > 2.0"),  # each drop 3 <= 5
    (report(), 1001, "params added 1,001 > 1,000"),
    (report(locator_acc=89.0), 0, "locator accuracy 89.0 < 90.0"),
], ids=["new-task-acc", "per-task-forgetting", "average-drop", "params", "locator-acc"])
def test_each_threshold_alone_rejects_with_its_reason(candidate: EvalReport, params_added: int, reason: str) -> None:
    decision = decide(POLICY, candidate, CHAMPION, params_added)
    assert (decision.outcome, decision.reasons) == ("reject", [reason])


def test_every_failed_threshold_is_listed() -> None:
    decision = decide(POLICY, report(a=0.0, new=0.0, locator_acc=0.0), CHAMPION, params_added=5000)
    assert decision.outcome == "reject"
    assert len(decision.reasons) == 5


def test_require_review_sends_a_passing_candidate_to_a_person() -> None:
    decision = decide(POLICY.model_copy(update={"require_review": True}), report(), CHAMPION, params_added=0)
    assert decision.outcome == "review"
    assert "require_review" in decision.reasons[0]


def test_require_review_does_not_rescue_a_failing_candidate() -> None:
    decision = decide(POLICY.model_copy(update={"require_review": True}), report(new=0.0), CHAMPION, params_added=0)
    assert decision.outcome == "reject"


def test_without_a_champion_or_a_locator_those_checks_do_not_apply() -> None:
    decision = decide(POLICY, report(a=0.0, b=0.0, locator_acc=None), None, params_added=0)
    assert decision.outcome == "approve"
    assert decision.metrics["avg_drop"] == 0.0 and decision.metrics["locator_acc"] is None


def test_no_params_limit_means_any_growth_passes() -> None:
    unlimited = POLICY.model_copy(update={"max_params_added": None})
    assert decide(unlimited, report(), CHAMPION, params_added=10**9).outcome == "approve"
