"""`cmoe data`: check, describe and push task bundles (local folders or s3:// prefixes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmoe.cli.common import error, fail
from cmoe.data.bundle import BundleError, printable
from cmoe.data.storage import StorageError, check_inbox, is_s3
from cmoe.data.validate import ValidationReport, validate as validate_uri

app = typer.Typer(no_args_is_help=True)

UriArg = Annotated[str, typer.Argument(help="Bundle folder or s3://bucket/prefix/.", show_default=False)]
CacheOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Cache for S3 downloads (default: $CMOE_CACHE_DIR or .cmoe/cache)."),
]


def _checked(uri: str, cache_dir: Path | None) -> ValidationReport:
    """Validate `uri`; on problems print each as `path:line: message` and exit 1 (2 if storage fails)."""
    try:
        report = validate_uri(uri, cache_dir=cache_dir)
    except StorageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    if not report.ok:
        # Plain echo, not rich: paths with brackets must print verbatim, one problem per line.
        for problem in report.problems:
            typer.echo(str(problem))
        typer.echo(f"invalid: {len(report.problems)} problem(s) in {uri}", err=True)
        raise typer.Exit(1)
    return report


@app.command()
def validate(uri: UriArg, cache_dir: CacheOpt = None) -> None:
    """Check a bundle: print its name, rows per split and sha256, or every problem (exit 1)."""
    report = _checked(uri, cache_dir)
    typer.echo(f"name: {report.spec.name}")
    for split, count in report.counts.items():
        typer.echo(f"{split}: {count}")
    typer.echo(f"sha256: {report.sha256}")


@app.command()
def info(uri: UriArg, cache_dir: CacheOpt = None) -> None:
    """Describe a valid bundle: task spec, layout and rows of each split, files, size, sha256."""
    report = _checked(uri, cache_dir)
    spec, root = report.spec, report.root
    files = [p for p in root.rglob("*") if p.is_file()]
    # A bundle's own text never reaches the terminal raw: escape sequences removed, controls escaped.
    typer.echo(f"name:           {spec.name}")
    typer.echo(f"description:    {printable(spec.description)}")
    typer.echo(f"metric:         {spec.metric}")
    typer.echo(f"instruction:    {printable(spec.instruction) if spec.instruction is not None else '(none)'}")
    typer.echo(f"format_version: {spec.format_version}")
    for split, count in report.counts.items():
        typer.echo(f"{split + ':':<16}{count} rows ({report.layouts[split]})")
    typer.echo(f"files:          {len(files)} ({sum(p.stat().st_size for p in files)} bytes)")
    typer.echo(f"sha256:         {report.sha256}")
    if root != Path(uri):
        typer.echo(f"local copy:     {root}")


@app.command()
def push(
    bundle: Annotated[Path, typer.Argument(help="Local bundle folder.", show_default=False)],
    inbox: Annotated[str, typer.Argument(help="Inbox: a local folder or s3://bucket/prefix/.", show_default=False)],
    cache_dir: CacheOpt = None,
) -> None:
    """Validate a bundle, deliver it into an inbox (task.yaml last) and announce it to Prefect (`cmoe.bundle.ready`)."""
    from cmoe.data.writer import deliver_bundle, delivered_sha256, inbox_uri

    report = _checked(str(bundle), cache_dir)
    bundle = bundle.resolve()
    inbox = inbox if is_s3(inbox) else str(Path(inbox).resolve())  # the event carries where the bundle is
    try:
        check_inbox(inbox)
        there = delivered_sha256(inbox, bundle.name, cache_dir=cache_dir)
        if there not in (None, report.sha256):
            raise FileExistsError(f"{inbox_uri(inbox, bundle.name)}: holds another bundle of that name (sha256 "
                                  f"{there}); bundles are immutable, rename yours")
        uri = inbox_uri(inbox, bundle.name) if there else deliver_bundle(bundle, inbox)
    except StorageError as err:
        error(err)
        raise typer.Exit(2) from None
    except (FileExistsError, BundleError, ValueError, OSError) as err:
        raise fail(err) from None
    typer.echo(f"{'already there' if there else 'delivered'}: {uri} (sha256 {report.sha256})")
    _announce(uri, report.sha256, bundle.name)


def _announce(uri: str, sha256: str, name: str) -> None:
    """Send `cmoe.bundle.ready`; the push stands either way (the bundle is complete in the inbox)."""
    from flows.events import NotAnnounced, announce

    try:
        event = announce(uri, sha256, name, "cmoe data push")
    except NotAnnounced as err:
        typer.echo(f"not announced: {err}; the inbox watcher (`cmoe watch`, or the watch-inbox deployment) "
                   "picks the bundle up", err=True)
        return
    typer.echo(f"announced: {event.event} {event.id} (resource {event.resource.id}): the continual-task "
               "deployment's trigger starts a flow run for it")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the bundles into (one per task, in order).")],
    suite: Annotated[str, typer.Option(help="Which synthetic suite.")] = "coin-mini",
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    train: Annotated[int, typer.Option(help="Training examples per task.")] = 1200,
    test: Annotated[int, typer.Option(help="Test examples per task.")] = 200,
) -> None:
    """Write the synthetic CoIN-like suite (task bundles in order + the base's pretraining corpus)."""
    from cmoe.data.synth import synth_suite

    try:
        paths = synth_suite(out, suite=suite, seed=seed, n_train=train, n_test=test)
    except (ValueError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    for p in paths:
        typer.echo(str(p))
    typer.echo(f"{len(paths)} task bundles + pretraining corpus in {out}")
