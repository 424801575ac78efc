"""`cmoe retire TASK`: forget one task of the champion — a data owner's "forget this task's data" request.

A thin wrapper over the flow `retire-task` (flows/retire.py): a candidate without the task's
router, locator VAE, evaluation set and the experts no other task uses, through the same gate and
review as a new task; prints the decision and the version as `cmoe run` does.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cmoe.cli.common import ConfigOpt, run_and_report, setup


def retire(
    task: Annotated[str, typer.Argument(help="The task to forget (a task of the champion).")],
    config: ConfigOpt = None,
) -> None:
    """Retire TASK from the champion (flow `retire-task`); its evaluation set is deleted once approved."""
    _, config_path = setup(config)
    from flows.retire import retire_task

    run_and_report(lambda: retire_task(task, config_path), prefix="retire ")
