"""The gate policy on hand-made evaluations: approve, reject on each threshold alone, or send to review."""

from __future__ import annotations

import pytest

from cmoe.config import GateConfig
from cmoe.stages.evaluate import EvalReport
from cmoe.stages.gate import decide

POLICY = GateConfig(min_new_task_acc=50.0, max_forgetting=5.0, max_forgetting_since_learned=10.0, max_avg_drop=2.0,
                    max_params_added=1000, min_locator_acc=90.0, min_locator_margin=0.2, max_unsure_share=25.0)
CHAMPION = {"a": 80.0, "b": 70.0}  # the champion's recorded accuracies on the old tasks
SURE = [0.9] * 4  # the locator's margin on each of the new task's inputs


def report(a: float = 80.0, b: float = 70.0, new: float = 60.0, locator_acc: float | None = 95.0,
           learned: tuple[float, float] | None = (80.0, 70.0), margins: list[float] | None = SURE) -> EvalReport:
    """A candidate that learned tasks a, b, then c (new); only the fields the gate reads matter.

    `learned`: a's and b's accuracy right after each was learned (the matrix diagonal; None = unknown);
    `margins`: the locator's margin per input of c (None = a single-router model).
    """
    acc = {"a": a, "b": b, "c": new}
    la, lb = learned or (None, None)
    return EvalReport(
        tasks=["a", "b", "c"], acc=acc, oracle_acc=dict(acc), locator_acc=locator_acc, confusion=None,
        matrix=[[la, None, None], [a, lb, None], [a, b, new]], avg_acc=(a + b + new) / 3, mft=None, bwt=None,
        forgetting=None, maa=None, params_total=10_000, params_active=5_000, params_added=[0, 0, 0],
        eval_samples_per_s=1.0, report_json="", heatmap_png="",
        locator_margin={} if margins is None else {"a": [0.0] * 4, "c": margins},
    )


def test_a_candidate_within_every_threshold_is_approved() -> None:
    decision = decide(POLICY, report(a=79.0, b=71.0), CHAMPION, params_added=1000)
    assert decision.outcome == "approve"
    assert decision.metrics["new_task_acc"] == 60.0
    assert decision.metrics["avg_drop"] == pytest.approx(0.0)
    assert decision.metrics["max_drop"] == pytest.approx(1.0)
    assert decision.metrics["max_drop_since_learned"] == pytest.approx(1.0)
    assert decision.metrics["unsure_share"] == 0.0


@pytest.mark.parametrize("candidate, params_added, reason", [
    (report(new=49.9), 0, "new task c: accuracy 49.9 < 50.0"),
    (report(a=74.0, b=76.0), 0, "old task a: dropped 6.0 points > 5.0"),  # average drop 0
    (report(a=77.0, b=67.0), 0, "average drop on old tasks 3.0 > 2.0"),  # each drop 3 <= 5
    (report(), 1001, "params added 1,001 > 1,000"),
    (report(locator_acc=89.0), 0, "locator accuracy 89.0 < 90.0"),
    # 4 points below the champion (within 5), but 11 below what a scored when it was learned
    (report(a=76.0, b=70.0, learned=(87.0, 70.0)), 0, "old task a: dropped 11.0 points since it was learned > 10.0"),
], ids=["new-task-acc", "per-task-forgetting", "average-drop", "params", "locator-acc", "since-learned"])
def test_each_threshold_alone_rejects_with_its_reason(candidate: EvalReport, params_added: int, reason: str) -> None:
    decision = decide(POLICY, candidate, CHAMPION, params_added)
    assert (decision.outcome, decision.reasons) == ("reject", [reason])


def test_every_failed_threshold_is_listed() -> None:
    decision = decide(POLICY, report(a=0.0, new=0.0, locator_acc=0.0), CHAMPION, params_added=5000)
    assert decision.outcome == "reject"
    assert len(decision.reasons) == 6


def test_small_drops_per_version_cannot_add_up() -> None:
    """Three versions each losing 4 points of task a pass the champion check every time; the third
    is 12 points below a's learned-time accuracy and is rejected."""
    champion, learned = 88.0, 88.0
    outcomes = []
    for _ in range(3):
        now = champion - 4.0
        decision = decide(POLICY, report(a=now, learned=(learned, 70.0)), {"a": champion, "b": 70.0}, 0)
        outcomes.append(decision.outcome)
        champion = now
    assert outcomes == ["approve", "approve", "reject"]
    assert decision.metrics["max_drop_since_learned"] == pytest.approx(12.0)


def test_an_unknown_learned_time_accuracy_is_not_checked() -> None:
    decision = decide(POLICY, report(a=60.0, learned=None), {"a": 60.0, "b": 70.0}, params_added=0)
    assert decision.outcome == "approve" and decision.metrics["max_drop_since_learned"] == 0.0


def test_an_unsure_locator_sends_the_candidate_to_review_with_the_share() -> None:
    margins = [0.9, 0.1, 0.05, 0.9]  # half of c's inputs below the 0.2 margin
    decision = decide(POLICY, report(margins=margins), CHAMPION, params_added=0)
    assert decision.outcome == "review"
    assert decision.reasons == ["locator unsure on 50.0 % of c's inputs (margin < 0.20) > 25.0 %"]
    assert decision.metrics["unsure_share"] == 50.0


def test_an_unsure_share_at_the_limit_passes_and_a_failing_candidate_is_still_rejected() -> None:
    assert decide(POLICY, report(margins=[0.1, 0.9, 0.9, 0.9]), CHAMPION, 0).outcome == "approve"  # 25 % <= 25 %
    assert decide(POLICY, report(new=0.0, margins=[0.0] * 4), CHAMPION, 0).outcome == "reject"


def test_require_review_sends_a_passing_candidate_to_a_person() -> None:
    decision = decide(POLICY.model_copy(update={"require_review": True}), report(), CHAMPION, params_added=0)
    assert decision.outcome == "review"
    assert "require_review" in decision.reasons[0]


def test_require_review_does_not_rescue_a_failing_candidate() -> None:
    decision = decide(POLICY.model_copy(update={"require_review": True}), report(new=0.0), CHAMPION, params_added=0)
    assert decision.outcome == "reject"


def test_without_a_champion_or_a_locator_those_checks_do_not_apply() -> None:
    decision = decide(POLICY, report(a=0.0, b=0.0, locator_acc=None, learned=None, margins=None), None, params_added=0)
    assert decision.outcome == "approve"
    assert decision.metrics["avg_drop"] == 0.0 and decision.metrics["locator_acc"] is None
    assert decision.metrics["unsure_share"] is None


def test_no_params_limit_means_any_growth_passes() -> None:
    unlimited = POLICY.model_copy(update={"max_params_added": None})
    assert decide(unlimited, report(), CHAMPION, params_added=10**9).outcome == "approve"
