"""`cmoe review list | show | approve | reject` and `cmoe rollback`: the decisions on candidates.

Thin wrappers over the registry (MLflow) and the review protocol of the flows (a decision also
resumes the flow run waiting for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markdown import Markdown
from rich.table import Table

from cmoe.cli.common import ConfigOpt, console, fail, open_registry, setup, versions_table

app = typer.Typer(no_args_is_help=True)

ByOpt = Annotated[str, typer.Option("--by", help="Who decides (recorded on the version).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded on the version).")]
RefArg = Annotated[str, typer.Argument(help="Version number, or the flow-run name of a paused expansion plan.")]
VersionArg = Annotated[int, typer.Argument(help="Model version number.")]


@app.command("list")
def review_list(config: ConfigOpt = None) -> None:
    """Candidates and expansion plans waiting for a reviewer."""
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError

    registry = open_registry(cfg)
    try:
        versions, plans = registry.pending_reviews(), registry.pending_plans()
        champion = registry.aliases().get("champion")
    except RegistryError as err:
        raise fail(err) from None
    table = Table("ref", "kind", "task", "builds on", "gate metrics", title="pending reviews")
    for v in versions:
        metrics = ", ".join(f"{k} {x:.1f}" for k, x in v.gate.items())
        table.add_row(str(v.version), "version", v.task, f"v{v.parent_version or '-'}", metrics)
    for p in plans:
        table.add_row(p.tags.get("prefect_flow_run_name", p.run_id), "plan", p.task,
                      f"v{p.tags.get('parent_version', '-')}", "")
    console.print(table if table.row_count else "nothing waits for a review")
    console.print(f"champion: {f'v{champion}' if champion else 'none yet'}")


CardOpt = Annotated[bool, typer.Option("--card", help="Print the version's model card (its MLflow description).")]


@app.command("show")
def review_show(version: VersionArg, config: ConfigOpt = None, card: CardOpt = False) -> None:
    """Everything recorded about one version: lineage, decision, accuracy, metrics, KPIs (or its model card)."""
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError

    registry = open_registry(cfg)
    try:
        v = registry.version(version)
    except RegistryError as err:
        raise fail(err) from None
    if card:
        console.print(Markdown(v.card or f"v{version} has no model card"))
        return
    aliases = [a for a, n in registry.aliases().items() if n == version]
    console.print(f"[bold]v{v.version}[/] {v.task} {' '.join(f'@{a}' for a in aliases)}")
    console.print(f"bundle:    {v.bundle_uri} (sha256 {v.bundle_sha256[:16]}…)")
    console.print(f"builds on: {f'v{v.parent_version}' if v.parent_version else 'the base'}")
    console.print(f"decision:  {v.decision}" + (f" by {v.decided_by}: {v.reason}" if v.decided_by else ""))
    console.print(versions_table([v]))
    for name, values in (("metrics", v.metrics), ("gate", v.gate), ("kpis", v.kpis)):
        console.print(f"{name}: " + ", ".join(f"{k} {x:g}" for k, x in values.items()))


def _decide(ref: str, decision: Literal["approve", "reject"], by: str, reason: str, config: Path | None) -> None:
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError
    from flows.review import submit_review

    try:
        console.print(submit_review(open_registry(cfg), ref, decision, by, reason))
    except RegistryError as err:
        raise fail(err) from None


@app.command("approve")
def review_approve(ref: RefArg, by: ByOpt, reason: ReasonOpt, config: ConfigOpt = None) -> None:
    """Approve: a version becomes champion; a plan gets trained. Resumes the waiting flow run."""
    _decide(ref, "approve", by, reason, config)


@app.command("reject")
def review_reject(ref: RefArg, by: ByOpt, reason: ReasonOpt, config: ConfigOpt = None) -> None:
    """Reject: the champion stays as it is. Resumes the waiting flow run."""
    _decide(ref, "reject", by, reason, config)


def rollback(version: VersionArg, config: ConfigOpt = None) -> None:
    """Move `champion` back to an earlier approved version."""
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError

    try:
        previous = open_registry(cfg).rollback(version)
    except RegistryError as err:
        raise fail(err) from None
    console.print(f"champion: v{previous} -> v{version}")
