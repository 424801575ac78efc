"""The registry gate's policy: approve, reject, or send a candidate to a person for review.

Pure function of the evaluation, the champion's recorded accuracies and the policy in config, so
the same decision is reproducible from the logged numbers alone.
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
    """Check the candidate against every threshold; any failure rejects, `require_review` defers.

    `learned=False` for a retirement: no task is new, every task of the report is an old one.
    """
    new_task = report.tasks[-1] if learned else None
    new_acc = report.acc[new_task] if new_task else None
    old = report.tasks[:-1] if learned else report.tasks
    drops = {t: champion_acc[t] - report.acc[t] for t in old if champion_acc and t in champion_acc}
    avg_drop = sum(drops.values()) / len(drops) if drops else 0.0
    failures = []
    if new_acc is not None and new_acc < policy.min_new_task_acc:
        failures.append(f"new task {new_task}: accuracy {new_acc:.1f} < {policy.min_new_task_acc:.1f}")
    for t, d in drops.items():
        if d > policy.max_forgetting:
            failures.append(f"old task {t}: dropped {d:.1f} points > {policy.max_forgetting:.1f}")
    if avg_drop > policy.max_avg_drop:
        failures.append(f"average drop on old tasks {avg_drop:.1f} > {policy.max_avg_drop:.1f}")
    if policy.max_params_added is not None and params_added > policy.max_params_added:
        failures.append(f"params added {params_added:,} > {policy.max_params_added:,}")
    if report.locator_acc is not None and report.locator_acc < policy.min_locator_acc:
        failures.append(f"locator accuracy {report.locator_acc:.1f} < {policy.min_locator_acc:.1f}")
    gate_metrics = {"new_task_acc": new_acc, "avg_drop": avg_drop, "max_drop": max(drops.values(), default=0.0),
                    "params_added": params_added, "locator_acc": report.locator_acc}
    if failures:
        return GateDecision("reject", failures, gate_metrics)
    if policy.require_review:
        return GateDecision("review", ["policy requires a person's review (gate.require_review)"], gate_metrics)
    return GateDecision("approve", ["every gate threshold holds"], gate_metrics)
