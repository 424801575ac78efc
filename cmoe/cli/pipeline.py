"""`cmoe run | watch | demo`: teach the champion new tasks, from one bundle or from the inbox.

Thin wrappers over the flows (Prefect). Without `PREFECT_API_URL`, Prefect runs on a local API
whose SQLite database lives under `<home>/prefect`, next to the MLflow database
`<home>/mlflow.db`: `prefect server start` and `mlflow ui` on those show the runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cmoe.cli.common import ConfigOpt, console, error, fail, open_registry, run_and_report, setup, versions_table
from cmoe.config import CmoeConfig
from cmoe.redact import redact_uri


def run(
    bundle: Annotated[str, typer.Argument(help="Bundle folder or s3://bucket/prefix/.")],
    config: ConfigOpt = None,
) -> None:
    """Teach the champion one task bundle (flow `continual-task`); print the decision and the version."""
    _, config_path = setup(config)
    from flows.continual import continual_task

    run_and_report(lambda: continual_task(bundle, config_path))


def watch(
    once: Annotated[bool, typer.Option("--once", help="Handle what is in the inbox now, then exit.")] = False,
    inbox: Annotated[str | None, typer.Option(help="Local folder or s3://bucket/prefix/ (default: config).")] = None,
    interval: Annotated[int, typer.Option(help="Seconds between looks at the inbox.")] = 60,
    config: ConfigOpt = None,
) -> None:
    """Process new bundles of the inbox one at a time, oldest first (flow `watch-inbox`)."""
    _, config_path = setup(config)
    from flows.watch import watch_inbox

    while True:
        try:
            outcomes = watch_inbox(config_path, inbox)
        except Exception as err:  # noqa: BLE001 - keep watching; the failed bundle is retried next time
            if once:
                raise fail(err) from None
            error(err)
        else:
            for o in outcomes:
                console.print(f"{o.task}: [bold]{o.decision}[/] (v{o.version})")
        if once:
            return
        time.sleep(interval)


def demo(
    # half the benchmark's 1 200: seven tasks' probes and expansions then fit the demo's few minutes
    train: Annotated[int, typer.Option(help="Training examples per synthetic task.")] = 600,
    test: Annotated[int, typer.Option(help="Test examples per synthetic task.")] = 200,
    config: ConfigOpt = None,
) -> None:
    """Whole pipeline on coin-mini: synthesise the inbox, build the base, learn every task, report."""
    cfg, config_path = setup(config)
    from cmoe.data.synth import synth_suite
    from cmoe.data.writer import deliver_bundle
    from cmoe.stages.pretrain import build_base
    from flows.watch import watch_inbox

    suite, inbox = cfg.home / "suite", cfg.inbox or str(cfg.home / "inbox")
    if not (suite / "pretrain" / "task.yaml").is_file():
        console.print(f"synthesising coin-mini into {suite} …")
        synth_suite(suite, seed=cfg.base.seed, n_train=train, n_test=test, n_pretrain=cfg.base.pretrain_samples,
                    varied_share=cfg.base.varied_share)
    for bundle in sorted(p for p in suite.iterdir() if p.name != "pretrain" and (p / "task.yaml").is_file()):
        deliver_bundle(bundle, inbox)
    if cfg.base.path is None:
        console.print("building the base (cached after the first run) …")
        base = build_base(cfg.base, cfg.home / "base", corpus=suite / "pretrain", cache_dir=cfg.home / "cache",
                          moe=cfg.moe)
        console.print(f"base {'reused' if base.reused else 'built'}: {base.params_total:,} params "
                      f"({base.wall_s:.0f} s)")
    try:
        watch_inbox(config_path, inbox)
    except Exception as err:  # noqa: BLE001 - report what was learned anyway
        error(err)
    if not print_results(cfg):
        raise typer.Exit(1)


def print_results(cfg: CmoeConfig) -> bool:
    """What `cmoe demo` prints once the inbox is learned: the accuracy matrix of every version, the
    champion's headline and the commands that open the UIs; whether there is a champion."""
    registry = open_registry(cfg)
    console.print(versions_table(registry.versions()))
    champion = registry.aliases().get("champion")
    if champion:
        final = registry.version(champion)
        console.print(f"champion v{champion}: Avg {final.metrics.get('avg_acc', float('nan')):.1f} %, "
                      f"BWT {final.metrics.get('bwt', float('nan')):+.2f} points (backward transfer: "
                      f"below 0 = old tasks forgotten), params added per task: "
                      + ", ".join(f"{v.task} {int(v.metrics.get('params_added', 0)):,}"
                                  for v in registry.lineage(champion)))
    _print_ui_commands(registry.tracking_uri)
    return champion is not None


def _tool(name: str) -> str:
    """A console script of this environment by full path (works without activating the venv)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _print_ui_commands(tracking_uri: str) -> None:
    """The exact commands that open the Prefect and MLflow UIs on these results (plain text: never
    wrapped), any password in their URIs shown as *** (the user has it; a terminal or log keeps it)."""
    tracking_uri = redact_uri(tracking_uri)
    prefect_ui = redact_uri(os.environ.get("PREFECT_API_URL", "").removesuffix("/api"))
    typer.echo("\nOpen the results:")
    if prefect_ui:
        typer.echo(f"  Prefect UI (flow runs, artifacts): {prefect_ui}")
    else:
        typer.echo(f"  PREFECT_HOME={os.environ['PREFECT_HOME']} {_tool('prefect')} server start")
        typer.echo("      then open http://127.0.0.1:4200 (Prefect UI: flow runs, artifacts, paused reviews)")
    if tracking_uri.startswith("sqlite:"):
        typer.echo(f"  {_tool('mlflow')} ui --backend-store-uri {tracking_uri} --port 5000")
        typer.echo("      then open http://127.0.0.1:5000 (MLflow UI: runs, model versions, decisions)")
    else:
        typer.echo(f"  MLflow UI (runs, model versions, decisions): {tracking_uri}")
