"""`cmoe lineage [VERSION]`: the tasks a model learned, in order, and what is kept of each one's data.

For every version the model builds on: its task and decision, the evaluation set the lineage keeps
(hash, rows, bytes, where) and the local copies of its training data removed once it was decided.
Nothing else of a task's data is kept (docs/data-lifecycle.md).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cmoe.cli.common import ConfigOpt, console, fail, open_registry, setup


def lineage(
    version: Annotated[int | None, typer.Argument(help="Version to trace (default: the champion).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Tasks in order, the evaluation set kept for each (hash, size, where), and what was removed."""
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError

    registry = open_registry(cfg)
    try:
        version = version if version is not None else registry.aliases().get("champion")
        if version is None:
            raise fail("no champion yet: nothing has been learned")
        chain = registry.lineage(version)
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
