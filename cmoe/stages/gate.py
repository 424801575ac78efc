"""The registry gate's policy: approve, reject, or send a candidate to a person for review.

Pure function of the evaluation, the champion's recorded accuracies and the policy in config, so
the same decision is reproducible from the logged numbers alone. Forgetting is measured twice per
old task: against the champion (one version's drop) and against the task's accuracy right after it
was learned (the evaluation's accuracy-matrix diagonal, which the lineage records), so drops within
the per-version limit cannot add up without limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cmoe.config import GateConfig
from cmoe.stages.evaluate import EvalReport

Outcome = Literal["approve", "reject", "review"]


@dataclass
class GateDecision:
    """What the gate decided and every reason for it; JSON-serialisable."""

    outcome: Outcome
    reasons: list[str]
    metrics: dict = field(default_factory=dict)


def decide(policy: GateConfig, report: EvalReport, champion_acc: dict[str, float] | None,
           params_added: int, *, learned: bool = True) -> GateDecision:
    """Check the candidate against every threshold; any failure rejects, an unsure locator or
    `require_review` defers to a person.

    `learned=False` for a retirement: no task is new, every task of the report is an old one.
    """
    new_task = report.tasks[-1] if learned else None
    new_acc = report.acc[new_task] if new_task else None
    old = report.tasks[:-1] if learned else report.tasks
    drops = {t: champion_acc[t] - report.acc[t] for t in old if champion_acc and t in champion_acc}
    avg_drop = sum(drops.values()) / len(drops) if drops else 0.0
    since_learned = drops_since_learned(report)
    unsure = unsure_share(report.locator_margin.get(new_task, []), policy.min_locator_margin) if new_task else None
    failures = []
    if new_acc is not None and new_acc < policy.min_new_task_acc:
        failures.append(f"new task {new_task}: accuracy {new_acc:.1f} < {policy.min_new_task_acc:.1f}")
    for t, d in drops.items():
        if d > policy.max_forgetting:
            failures.append(f"old task {t}: dropped {d:.1f} points > {policy.max_forgetting:.1f}")
    for t, d in since_learned.items():
        if d > policy.max_forgetting_since_learned:
            failures.append(f"old task {t}: dropped {d:.1f} points since it was learned "
                            f"> {policy.max_forgetting_since_learned:.1f}")
    if avg_drop > policy.max_avg_drop:
        failures.append(f"average drop on old tasks {avg_drop:.1f} > {policy.max_avg_drop:.1f}")
    if policy.max_params_added is not None and params_added > policy.max_params_added:
        failures.append(f"params added {params_added:,} > {policy.max_params_added:,}")
    if report.locator_acc is not None and report.locator_acc < policy.min_locator_acc:
        failures.append(f"locator accuracy {report.locator_acc:.1f} < {policy.min_locator_acc:.1f}")
    gate_metrics = {"new_task_acc": new_acc, "avg_drop": avg_drop, "max_drop": max(drops.values(), default=0.0),
                    "max_drop_since_learned": max(since_learned.values(), default=0.0),
                    "params_added": params_added, "locator_acc": report.locator_acc, "unsure_share": unsure}
    if failures:
        return GateDecision("reject", failures, gate_metrics)
    reviews = []
    if unsure is not None and unsure > policy.max_unsure_share:
        reviews.append(f"locator unsure on {unsure:.1f} % of {new_task}'s inputs (margin < "
                       f"{policy.min_locator_margin:.2f}) > {policy.max_unsure_share:.1f} %")
    if policy.require_review:
        reviews.append("policy requires a person's review (gate.require_review)")
    if reviews:
        return GateDecision("review", reviews, gate_metrics)
    return GateDecision("approve", ["every gate threshold holds"], gate_metrics)


def drops_since_learned(report: EvalReport) -> dict[str, float]:
    """Per earlier task, points lost since right after it was learned (its accuracy-matrix diagonal,
    recorded by the version that learned it); tasks whose learned-time accuracy is unknown are left out.

    The last row is the candidate's own: its diagonal is not a learned-time accuracy (it is the new
    task, or in a retirement the last remaining task, which is then checked against the champion only).
    """
    return {t: report.matrix[i][i] - report.acc[t] for i, t in enumerate(report.tasks[:-1])
            if report.matrix[i][i] is not None}


def unsure_share(margins: list[float], min_margin: float) -> float | None:
    """Percent of inputs whose locator margin is below `min_margin`; None without margins (one router)."""
    return 100 * sum(m < min_margin for m in margins) / len(margins) if margins else None
