"""`cmoe compact`: a candidate with fewer experts — the lineage's growth kept bounded.

Without options, a thin wrapper over the flow `compact-lineage` (flows/compact.py): the champion
without the task experts no router uses and with near-identical ones merged, every task within
`compact.max_drop`, through the same gate and review as a new task; prints the decision and the
version as `cmoe run` does. With `--state DIR --out DIR`, the compaction of one state directory
alone (no registry, no gate): the new state goes to OUT/state.
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
    console.print(f"{summary_line(result)}\nstate: {result.state_dir}")
