"""How a lineage's CMoE layers grew and shrank: experts added by each task, merged and retired by each compaction.

Read from one state alone, its manifest's `experts` (the task that added each expert, `base` for the
upcycled copies) and `compactions` (the kept steps of every compaction, in order; cmoe.model.compaction):
an expert a task added is either still there under that task's name, or left the pool once, as a
retired expert or as the second expert of a merge (the merged one keeps the first's task). So the
count of every layer after each event follows from the latest state, with no earlier one at hand.
A compaction comes right after the task that was last when it ran (`after_task`). A task a later
`cmoe retire` removed is no longer in the state: the experts it left to its heir count as the heir's.

The KPI stage plots it with every version (`cmoe.stages.kpi.plot_growth`); `cmoe lineage` lists it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BASE = "base"  # origin of the upcycled experts (cmoe.model.cmoe_layer.BASE)


@dataclass
class GrowthEvent:
    """One task learned or one compaction, per CMoE layer: experts after it and what it changed."""

    kind: Literal["learn", "compact"]
    task: str  # the task learned; for a compaction the task it came after
    experts: dict[str, int]  # per layer, after the event
    added: dict[str, int] = field(default_factory=dict)
    merged: dict[str, int] = field(default_factory=dict)  # merges: each takes one expert out of the layer
    retired: dict[str, int] = field(default_factory=dict)
    delta: str = ""  # a learned task's delta of the base experts: "own", "from <task>" or "" (none)

    @property
    def label(self) -> str:
        return self.task if self.kind == "learn" else f"compact after {self.task}"


def growth_events(experts: dict[str, dict[str, int]], tasks: list[str], compactions: list[dict]) -> list[GrowthEvent]:
    """Every task learned and every compaction, in order, from a state's {layer: {origin: experts}}, its
    task order and its compaction history."""
    removed: dict[str, dict[str, int]] = {layer: {} for layer in experts}  # per layer: experts of each task gone
    for entry in compactions:
        for step in entry["steps"]:
            gone = step["origins"][0] if step["kind"] == "retire" else step["origins"][1]
            by = removed.setdefault(str(step["layer"]), {})
            by[gone] = by.get(gone, 0) + 1
    # a compaction after a task no longer in the state sits after the previous event
    position, after = [], 0
    for entry in compactions:
        if entry.get("after_task") in tasks:
            after = tasks.index(entry["after_task"]) + 1
        position.append(after)
    events: list[GrowthEvent] = []
    count = {layer: by.get(BASE, 0) for layer, by in experts.items()}

    def compactions_at(at: int) -> None:
        nonlocal count
        for entry, where in zip(compactions, position):
            if where == at:
                events.append(_compaction(entry, count))
                count = events[-1].experts

    compactions_at(0)
    for i, task in enumerate(tasks):
        added = {layer: by.get(task, 0) + removed.get(layer, {}).get(task, 0) for layer, by in experts.items()}
        count = {layer: n + added[layer] for layer, n in count.items()}
        events.append(GrowthEvent("learn", task, dict(count), added=added))
        compactions_at(i + 1)
    return events


def _compaction(entry: dict, count: dict[str, int]) -> GrowthEvent:
    """The event of one compaction entry, applied to the counts before it."""
    merged = {layer: 0 for layer in count}
    retired = {layer: 0 for layer in count}
    for step in entry["steps"]:
        (merged if step["kind"] == "merge" else retired)[str(step["layer"])] += 1
    after = {layer: n - merged[layer] - retired[layer] for layer, n in count.items()}
    return GrowthEvent("compact", entry.get("after_task") or "", after, merged=merged, retired=retired)


def manifest_growth(manifest: dict) -> list[GrowthEvent]:
    """growth_events of a state manifest (cmoe.model.state): its experts' origins, tasks and compactions."""
    experts = {}
    for layer, origins in manifest["experts"].items():
        by: dict[str, int] = {}
        for origin in origins:
            by[origin] = by.get(origin, 0) + 1
        experts[layer] = by
    events = growth_events(experts, list(manifest["tasks"]), list(manifest.get("compactions", [])))
    uses = manifest.get("delta_uses", {})
    for e in events:
        if e.kind == "learn" and "delta" in manifest["deltas"].get(e.task, {}):
            e.delta = "own"
        elif e.kind == "learn" and e.task in uses:
            e.delta = "from " + ", ".join(sorted(set(uses[e.task].values())))
    return events
