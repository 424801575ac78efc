"""`cmoe doctor`: versions, device, launcher and every configured service, one OK/FAIL line each."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cmoe.cli.common import ConfigOpt, load
from cmoe.redact import redact_uri

console = Console(soft_wrap=True)  # a long detail stays on its line: the output is grep-able
_STYLE = {"OK": "green", "FAIL": "bold red", "SKIP": "yellow"}


def doctor(
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds each network check may take.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check versions, GPU/CPU, the DeepSpeed launcher, Prefect, MLflow, the artifact store, the inbox.

    Exits 1 when a configured service (or the local set-up) fails; SKIP = not configured, the
    embedded default is used.
    """
    cfg = load(config)
    # The same Prefect home as `cmoe run` / `cmoe watch`, so a profile set there is seen here too.
    if (cfg.home / "prefect").is_dir():  # (the doctor writes nothing: no new folder just for this)
        os.environ.setdefault("PREFECT_HOME", str((cfg.home / "prefect").resolve()))
    from cmoe.doctor import as_dicts, failed, run_checks

    checks = run_checks(cfg, timeout=timeout)
    if as_json:
        typer.echo(redact_uri(json.dumps(as_dicts(checks), indent=2)))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:  # a detail may quote a URI with its password: never print that
            console.print(f"[{_STYLE[c.status]}]{c.status:<4}[/] {c.name:<{width}}  {escape(redact_uri(c.detail))}")
    if failed(checks):
        raise typer.Exit(1)
