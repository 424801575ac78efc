"""What every `cmoe` command shares: the --config option, config loading, errors, the registry, tables."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cmoe.config import CmoeConfig, ConfigError, load_config
from cmoe.redact import redact_uri
from cmoe.stages.report import Row, accuracy_table, cell

if TYPE_CHECKING:
    from cmoe.registry import VersionInfo

# Tables stay readable when the output goes to a file or a CI log (rich would assume 80 columns).
console = Console(width=max(Console().width, 110))

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (defaults: embedded tiny setup).")]


def error(message: object) -> None:
    """Print `error: <message>` on stderr, verbatim (paths and brackets as they are, never wrapped),
    any URI's password redacted."""
    typer.echo(f"{typer.style('error:', fg='red')} {redact_uri(str(message))}", err=True)


def fail(err: object) -> typer.Exit:
    """Print `err` as an error; the exit (status 1) for the caller to raise."""
    error(err)
    return typer.Exit(1)


def load(config: Path | None) -> CmoeConfig:
    """The config of `--config`; a bad one prints `error: <file>: <field>: <reason>` and exits 2 (no traceback)."""
    try:
        return load_config(config)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None


def setup(config: Path | None) -> tuple[CmoeConfig, str | None]:
    """Load the config and point Prefect at `<home>/prefect`; returns the config and its absolute path."""
    cfg = load(config)
    # Must precede the first `import prefect` (the flows are imported lazily, after this). Prefect
    # creates its home without parents and then cannot start its local API: create it here.
    if "PREFECT_HOME" not in os.environ:
        prefect_home = (cfg.home / "prefect").resolve()
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)
    # The local API's first start takes ~30 s on 2 cores; Prefect's default gives up after 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return cfg, str(config.resolve()) if config else None


def ensure_base(cfg: CmoeConfig) -> None:
    """Without `base.path`, build the tiny base under `<home>/base` (reused once built) and point the config at it."""
    if cfg.base.path is not None:
        return
    from cmoe.stages.pretrain import build_base

    built = build_base(cfg.base, cfg.home / "base", cache_dir=cfg.home / "cache", moe=cfg.moe)
    console.print(f"base: {built.path} ({'reused' if built.reused else f'built in {built.wall_s:.0f} s'})")
    cfg.base.path = str(built.path)


def open_registry(cfg: CmoeConfig):  # noqa: ANN201 - import kept lazy: MLflow takes seconds to import
    """The MLflow registry of the config."""
    from cmoe.registry import Registry

    return Registry(cfg)


def versions_table(versions: list[VersionInfo]) -> Table:
    """Accuracy matrix (row: version, column: task T1..Tn) with Avg, BWT, params added and the decision."""
    tasks = list(dict.fromkeys(t for v in versions for t in v.acc))
    rows = [Row([f"v{v.version}", v.task], [v.acc.get(t) for t in tasks],
                [cell(v.metrics.get("avg_acc")), cell(v.metrics.get("bwt"), "+.1f"),
                 cell(v.metrics.get("params_added"), ",.0f"), f"{v.decision} ({v.decided_by})"]) for v in versions]
    text = accuracy_table(["version", "task"], [f"T{i + 1}" for i in range(len(tasks))], rows,
                          ["Avg", "BWT", "params added", "decision"])
    table = Table(*text.header, title="accuracy (%) of every task learned so far",
                  caption="  ".join(f"T{i + 1} = {t}" for i, t in enumerate(tasks)))
    for row in text.rows:
        table.add_row(*row)
    return table


def run_and_report(flow: Callable[[], Any], prefix: str = "") -> None:
    """Run a task flow (continual-task, retire-task) and print its decision and version on one line;
    a failure is one error line (the flow has logged its traceback)."""
    try:
        outcome = flow()
    except Exception as err:  # noqa: BLE001 - the flow already logged the traceback
        raise fail(err) from None
    version = f"v{outcome.version}" if outcome.version is not None else "no version"
    console.print(f"{prefix}{outcome.task}: [bold]{outcome.decision}[/] ({version}) by {outcome.decided_by}: "
                  f"{outcome.reason}")
