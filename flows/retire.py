"""Prefect flow `retire-task`: a candidate without one task — the "forget this task's data" request.

A data owner may ask that a learned task be forgotten. The flow builds on the champion, as a new
task does, and goes through the same evaluation, gate and review as `continual-task` (the tasks
of flows/continual.py, the review protocol of flows/review.py); only its first stage differs:

    retire     a state without the task's router, locator VAE and record, and without the experts
               no later task's router picks (cmoe/stages/retire.py)           -> artifact `cmoe-retire`
    evaluate   re-test every remaining task on its kept evaluation set          -> `cmoe-accuracy`
    gate       register the candidate; every remaining task is checked against the champion (none
               is new), then approve, reject or ask a reviewer                -> `cmoe-decision`

Once the retirement is approved, the task's kept evaluation set — the last of its data the
lineage keeps — is deleted from the store, with its local copy. Not before: a rejected retirement
leaves the champion in use, which still re-tests the task on it. A retirement approved while no
run waited for it (answered after its run gave up on the review) is finished by running the flow
again: it finds the retirement in the champion's lineage and deletes what is left.

The version's `task` tag names the retired task and its `retired` tag says it was retired; its
`retention.removed` tag lists the evaluation set deleted. Older versions still hold the task (they
are rollback targets) but cannot be re-tested on it once its evaluation set is gone. Stages write
into `<home>/runs/retire-<task>-v<champion>/` and resume like continual-task's: the same task on
the same champion is the same work, so asking again after a rejection returns that rejection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from cmoe.config import CmoeConfig, load_config
from cmoe.data.evalsets import EvalSetRef, delete_eval_set
from cmoe.registry import REMOVED_TAG, RETIRED_TAG, Champion, Registry, VersionInfo, held_versions
from flows.continual import (
    Candidate, GateResult, TaskOutcome, decision_markdown, evaluate, gate, headline, link_run, measure, resumable,
    review_markdown, stage_task,
)
from flows.lineage_slot import lineage_slot
from flows.review import settle

if TYPE_CHECKING:  # the stage (torch) is imported inside the task that runs it
    from cmoe.stages.kpi import TaskKpis
    from cmoe.stages.retire import RetireResult


@stage_task(name="retire")
def retire(cfg: CmoeConfig, task: str, champion: Champion, runs: Path, registry: Registry,
           run_id: str) -> RetireResult:
    """A new state without `task`: its router, locator VAE and record, and the experts no later task uses."""
    from cmoe.stages.retire import RetireResult, run_retire

    result = resumable(runs / "retire", RetireResult, lambda out: run_retire(cfg, champion.state_dir, task, out))
    registry.log_stage(run_id, "retire", result)
    create_table_artifact(
        key="cmoe-retire",
        table=[{"layer": x["layer"], "expert": x["index"], "kept": x["kept"],
                **{f"picked by {t}": n for t, n in x["uses"].items()}} for x in result.experts],
        description=f"Retiring **{task}**: {retire_line(result)}",
    )
    return result


@stage_task(name="forget-eval-set")
def forget_eval_set(cfg: CmoeConfig, learned: VersionInfo, registry: Registry, version: int) -> list[str]:
    """Delete the retired task's kept evaluation set (store and local copy); record it on the retirement's version."""
    removed = []
    if learned.eval_set is not None:
        ref = EvalSetRef.from_dict(learned.eval_set)
        delete_eval_set(ref, cache_dir=cfg.home / "cache")
        removed.append(ref.uri)
    registry.tag_version(version, {REMOVED_TAG: json.dumps(removed)})
    return removed


@flow(name="retire-task", persist_result=True, result_serializer="json")
def retire_task(task: str, config_path: str | None = None) -> TaskOutcome:
    """Retire `task` from the champion, then approve, reject or ask a reviewer; approved, delete its evaluation set."""
    cfg = load_config(config_path)
    with lineage_slot(cfg.flow.lineage_limit):  # no arrival may build on the champion meanwhile
        return retire_from_champion(cfg, Registry(cfg), task)


def retire_from_champion(cfg: CmoeConfig, registry: Registry, task: str) -> TaskOutcome:
    """The body of `retire_task`, run while holding the lineage's slot."""
    champion = registry.champion()
    if champion is None:
        raise ValueError("no champion yet: there is no task to retire")
    lineage = registry.lineage(champion.version)
    held = held_versions(lineage)
    if (done := next((v for v in lineage if v.retired == task), None)) is not None:
        # Approved (it is in the champion's lineage) while no run waited for it: finish it.
        learned = next(v for v in lineage if v.task == task and v.retired is None)
        if done.removed is None:
            forget_eval_set(cfg, learned, registry, done.version)
        return version_outcome(registry.version(done.version), done.parent_version)
    learned = next((v for v in held if v.task == task), None)
    if learned is None:
        raise ValueError(f"task {task!r} is not one the champion v{champion.version} holds "
                         f"(tasks: {[v.task for v in held]})")
    remaining = [v for v in held if v is not learned]
    key = f"retire-{task}-v{champion.version}"
    runs = cfg.home / "runs" / key
    run_id = registry.start_task_run(key, task, "", champion.version, cfg.model_dump(mode="json"),
                                     tags={"prefect_flow_run_id": str(flow_run.id), RETIRED_TAG: task})
    link_run(registry, run_id, f"retiring {task}")

    def first() -> tuple[Candidate, str]:
        retired = retire(cfg, task, champion, runs, registry, run_id)
        return (Candidate(task, retired.state_dir, retired.params_added, "", "", {RETIRED_TAG: task}, learned=False),
                f"{task} ({retire_line(retired)})")

    # the matrix's rows are the remaining tasks' own; the candidate's is the last
    info, result, kpis = through_gate(cfg, registry, champion, key, runs, run_id, "retire", first, remaining[:-1])
    if info.decision == "approved":
        forget_eval_set(cfg, learned, registry, info.version)
    outcome = version_outcome(info, champion.version)
    create_markdown_artifact(key="cmoe-decision", markdown=decision_markdown(outcome, result, kpis),
                             description=f"Gate decision on retiring {task}")
    return outcome


def through_gate(cfg: CmoeConfig, registry: Registry, champion: Champion, key: str, runs: Path, run_id: str,
                 stage: str, first: Callable[[], tuple[Candidate, str]],
                 rows: list[VersionInfo]) -> tuple[VersionInfo, GateResult, TaskKpis]:
    """A candidate that learns no task (a retirement, a compaction) from its `stage` (`first`: the candidate
    and a line saying what it changed), evaluated, measured and gated, its decision settled; the run ends
    failed if any of it fails. `rows`: the versions whose accuracy rows come before the candidate's."""
    try:
        candidate, what = first()
        report = evaluate(cfg, f"after {stage} {what}", candidate.state_dir, rows, runs, registry, run_id)
        summary = headline(report, candidate.params_added)
        registry.log_summary(run_id, {"acc": report.acc, **summary})
        kpis = measure(cfg, candidate.task, candidate.params_added, report, [stage, "evaluate"], {}, runs, registry,
                       run_id)
        result = gate(cfg, candidate, champion, key, report, summary, kpis, runs, registry, run_id)
        info = settle(cfg, registry, result.version, result.outcome, result.reasons,
                      review_markdown(result, f"{stage} {what}", report, rows))
    except Exception:  # not BaseException: a suspended run (Prefect's Pause signal) has not failed
        registry.end_task_run(run_id, failed=True)
        raise
    registry.end_task_run(run_id)
    return info, result, kpis


def version_outcome(info: VersionInfo, parent: int | None) -> TaskOutcome:
    """A retirement's or compaction's outcome, in the shape a task arrival reports (no bundle)."""
    return TaskOutcome(info.task, "", parent, info.version, info.decision, info.decided_by, info.reason, info.acc,
                       info.metrics.get("avg_acc"), info.metrics.get("bwt"), int(info.metrics.get("params_added", 0)))


def retire_line(result: RetireResult) -> str:
    """One line: how many of the task's experts go and stay, and the parameters removed."""
    kept = f", {result.experts_kept} kept for {result.heir} (its router picks them)" if result.experts_kept else ""
    return (f"{result.experts_dropped} of its experts removed{kept}; "
            f"{-result.params_added:,} parameters removed")
