"""`cmoe lineage [VERSION]`: the tasks a model learned, in order, what is kept of each one's data, and its growth.

For every version the model builds on: its task and decision, the evaluation set the lineage keeps
(hash, rows, bytes, where) and the local copies of its training data removed once it was decided.
Nothing else of a task's data is kept (docs/data-lifecycle.md). Then the experts of every CMoE layer
after each task and each compaction, with the experts each added, merged and retired, and the delta
each task runs with (its own, or one it inherited), read from the version's state manifest alone
(cmoe.stages.growth).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cmoe.cli.common import ConfigOpt, console, fail, open_registry, setup

if TYPE_CHECKING:
    from cmoe.stages.growth import GrowthEvent


def lineage(
    version: Annotated[int | None, typer.Argument(help="Version to trace (default: the champion).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Tasks in order, the evaluation set kept for each (hash, size, where), what was removed, and the
    experts per layer after each task and compaction (added, merged, retired)."""
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError, held_versions
    from cmoe.stages.growth import manifest_growth

    registry = open_registry(cfg)
    try:
        version = version if version is not None else registry.aliases().get("champion")
        if version is None:
            raise fail("no champion yet: nothing has been learned")
        chain = registry.lineage(version)
        growth = manifest_growth(registry.manifest(version))
    except RegistryError as err:
        raise fail(err) from None
    table = Table("version", "task", "decision", "evaluation set kept", "rows", "bytes", "where",
                  "training data", title=f"lineage of v{version}")
    for v in chain:
        kept = v.eval_set or {}
        # The train split itself is never kept; this column lists cmoe's local copies that were deleted.
        removed = v.removed
        training = "–" if removed is None else f"removed {', '.join(removed)}" if removed else "no local copies"
        task = f"retire {v.retired}" if v.retired else v.task
        table.add_row(f"v{v.version}", task, v.decision, f"{kept['sha256'][:16]}…" if kept else "none",
                      f"{kept['rows']}/{kept['of_rows']}" if kept else "", f"{kept['bytes']:,}" if kept else "",
                      kept.get("uri", ""), training)
    console.print(table)
    learned_in = {v.task: f"v{v.version}" for v in held_versions(chain)}
    console.print(growth_table(growth, learned_in, version))


def growth_table(events: list[GrowthEvent], learned_in: dict[str, str], version: int) -> Table:
    """One row per task learned or compaction: each layer's experts after it (and its change), the totals."""
    layers = list(events[0].experts) if events else []
    table = Table("version", "after", *(f"layer {layer}" for layer in layers), "added", "merged", "retired", "delta",
                  title=f"experts per CMoE layer across the lineage of v{version}, and each task's delta")
    for e in events:
        table.add_row(learned_in.get(e.task, "") if e.kind == "learn" else "", e.label,
                      *(f"{e.experts[layer]}{_change(e, layer)}" for layer in layers),
                      *(str(sum(d.values())) for d in (e.added, e.merged, e.retired)), e.delta)
    return table


def _change(event: GrowthEvent, layer: str) -> str:
    parts = [f"+{event.added[layer]}" if event.added.get(layer) else "",
             f"{event.merged[layer]} merged" if event.merged.get(layer) else "",
             f"{event.retired[layer]} retired" if event.retired.get(layer) else ""]
    shown = ", ".join(p for p in parts if p)
    return f" ({shown})" if shown else ""
