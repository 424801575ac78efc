"""Prefect flow `compact-lineage`: a candidate with fewer experts — bounded growth, through the same gate.

A lineage that grows with every task ends up with experts no router uses and experts that answer
alike. The flow builds on the champion, as a retirement does (flows/retire.py), and goes through
the same evaluation, gate and review; only its first stage differs:

    compact    retire task experts no router uses, merge near-identical ones, each step kept only
               while every task stays within `compact.max_drop` (cmoe/stages/compact.py) -> `cmoe-compact`
    evaluate   re-test every task on its kept evaluation set                       -> `cmoe-accuracy`
    gate       register the candidate; every task is checked against the champion (none is new),
               then approve, reject or ask a reviewer                             -> `cmoe-decision`

The version's `compacted` tag says it learned no task (the lineage's held versions skip it); its
`task` tag is "compact". Stages write into `<home>/runs/compact-v<champion>-c<config hash>/` and
resume like continual-task's: the same compaction settings on the same champion are the same work,
so asking again after a rejection returns that rejection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from cmoe.config import CmoeConfig, load_config
from cmoe.registry import COMPACTED_TAG, Champion, Registry, held_versions
from flows.continual import Candidate, TaskOutcome, decision_markdown, link_run, resumable, stage_key, stage_task
from flows.lineage_slot import lineage_slot
from flows.retire import through_gate, version_outcome

if TYPE_CHECKING:  # the stage (torch) is imported inside the tasks that run it
    from cmoe.stages.compact import CompactResult

TASK = "compact"  # the `task` of a compaction's run and version: it learned none


@stage_task(name="compact")
def compact(cfg: CmoeConfig, champion: Champion, runs: Path, registry: Registry, run_id: str) -> CompactResult:
    """A new state of the champion without the experts it can spare, every task within `compact.max_drop`."""
    from cmoe.stages.compact import CompactResult, run_compact, summary_line

    result = resumable(runs / "compact", CompactResult, lambda out: run_compact(cfg, champion.state_dir, out))
    registry.log_stage(run_id, "compact", result)
    create_table_artifact(
        key="cmoe-compact",
        table=[{"step": s["kind"], "layer": s["layer"], "experts": str(s["experts"]), "outcome": s["outcome"],
                "drop": s.get("drop")} for s in result.steps],
        description=f"Compacting v{champion.version}: {summary_line(result)}",
    )
    return result


@flow(name="compact-lineage", persist_result=True, result_serializer="json")
def compact_lineage(config_path: str | None = None) -> TaskOutcome:
    """Compact the champion, then approve, reject or ask a reviewer."""
    cfg = load_config(config_path)
    with lineage_slot(cfg.flow.lineage_limit):  # no arrival may build on the champion meanwhile
        return compact_champion(cfg, Registry(cfg))


def compact_champion(cfg: CmoeConfig, registry: Registry) -> TaskOutcome:
    """The body of `compact_lineage`, run while holding the lineage's slot."""
    from cmoe.stages.compact import summary_line

    champion = registry.champion()
    if champion is None:
        raise ValueError("no champion yet: there is nothing to compact")
    held = held_versions(registry.lineage(champion.version))
    key = stage_key(TASK, champion.version, cfg)  # the compact settings are part of the work's name
    runs = cfg.home / "runs" / key
    run_id = registry.start_task_run(key, TASK, "", champion.version, cfg.model_dump(mode="json"),
                                     tags={"prefect_flow_run_id": str(flow_run.id), COMPACTED_TAG: "true"})
    link_run(registry, run_id, "the compaction")

    def first() -> tuple[Candidate, str]:
        compacted = compact(cfg, champion, runs, registry, run_id)
        tags = {COMPACTED_TAG: json.dumps({"retired": compacted.retired, "merged": compacted.merged})}
        return (Candidate(TASK, compacted.state_dir, compacted.params_added, "", "", tags, learned=False),
                f"v{champion.version} ({summary_line(compacted)})")

    # every task stays: the matrix's rows are the held versions', the candidate's is the last
    info, result, kpis = through_gate(cfg, registry, champion, key, runs, run_id, TASK, first, held[:-1])
    outcome = version_outcome(info, champion.version)
    create_markdown_artifact(key="cmoe-decision", markdown=decision_markdown(outcome, result, kpis),
                             description="Gate decision on the compaction")
    return outcome

