"""`cmoe compact`: a candidate with fewer experts — the lineage's growth kept bounded.

Without options, a thin wrapper over the flow `compact-lineage` (flows/compact.py): the champion
without the task experts no router uses and with near-identical ones merged, every task within
`compact.max_drop`, through the same gate and review as a new task; prints the decision and the
version as `cmoe run` does. With `--state DIR --out DIR`, the compaction of one state directory
alone (no registry, no gate): the new state goes to OUT/state, every step tried (kind, layer,
score, kept or not, the worst drop) and each task's accuracy before and after to OUT/compact.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmoe.cli.common import ConfigOpt, console, fail, load, run_and_report, setup


def compact(
    state: Annotated[Path | None, typer.Option("--state", help="Compact this state directory (no gate).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where --state's compacted state goes (OUT/state).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Compact the champion (flow `compact-lineage`), or with --state/--out one state directory."""
    if (state is None) != (out is None):
        raise fail("give both --state and --out, or neither (then the champion is compacted through the gate)")
    if state is None:
        _, config_path = setup(config)
        from flows.compact import compact_lineage

        run_and_report(lambda: compact_lineage(config_path))
        return
    cfg = load(config)
    from cmoe.data.evalsets import EvalSetError
    from cmoe.model.state import StateError
    from cmoe.stages.common import StageError
    from cmoe.stages.compact import run_compact, summary_line

    try:
        result = run_compact(cfg, state, out)
    except (EvalSetError, StageError, StateError) as err:
        raise fail(err) from None
    console.print(summary_line(result))
    for layer, near in result.nearest.items():
        use, cos = near["least_use"], near["most_similar"]
        console.print(f"  layer {layer}: least-used task expert {'-' if use is None else f'{use:.3f}'} "
                      f"(retired at <= {cfg.compact.min_use}), most similar pair "
                      f"{'-' if cos is None else f'{cos:.3f}'} (merged at >= {cfg.compact.merge_similarity})",
                      markup=False, highlight=False)
    for task, before in result.acc_before.items():
        console.print(f"  {task}: {before:.1f} -> {result.acc_after[task]:.1f} %", markup=False, highlight=False)
    console.print(f"state: {result.state_dir}\nevery step tried: {out / 'compact.json'}", markup=False, highlight=False)
