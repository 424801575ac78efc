"""`cmoe run | watch | review | rollback | predict | demo`: the pipeline users run every day.

Thin wrappers over the flows (Prefect) and the registry (MLflow). Without `PREFECT_API_URL`,
Prefect runs on a local API whose SQLite database lives under `<home>/prefect`, next to the
MLflow database `<home>/mlflow.db`: `prefect server start` and `mlflow ui` on those show the runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from cmoe.config import CmoeConfig, ConfigError, load_config

# Tables stay readable when the output goes to a file or a CI log (rich would assume 80 columns).
console = Console(width=max(Console().width, 110))
review = typer.Typer(no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (defaults: embedded tiny setup).")]
ByOpt = Annotated[str, typer.Option("--by", help="Who decides (recorded on the version).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded on the version).")]
RefArg = Annotated[str, typer.Argument(help="Version number, or the flow-run name of a paused expansion plan.")]
VersionArg = Annotated[int, typer.Argument(help="Model version number.")]


def _setup(config: Path | None) -> tuple[CmoeConfig, str | None]:
    """Load the config and point Prefect at `<home>/prefect`; returns the config and its absolute path."""
    try:
        cfg = load_config(config)
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from None
    # Must precede the first `import prefect` (the flows are imported lazily, after this). Prefect
    # creates its home without parents and then cannot start its local API: create it here.
    if "PREFECT_HOME" not in os.environ:
        prefect_home = (cfg.home / "prefect").resolve()
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)
    # The local API's first start takes ~30 s on 2 cores; Prefect's default gives up after 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return cfg, str(config.resolve()) if config else None


def _registry(cfg: CmoeConfig):  # noqa: ANN202 - import kept lazy: MLflow takes seconds to import
    from cmoe.registry import Registry

    return Registry(cfg)


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/] {err}")
    return typer.Exit(1)


def run(
    bundle: Annotated[str, typer.Argument(help="Bundle folder or s3://bucket/prefix/.")],
    config: ConfigOpt = None,
) -> None:
    """Teach the champion one task bundle (flow `continual-task`); print the decision and the version."""
    _, config_path = _setup(config)
    from flows.continual import continual_task

    try:
        outcome = continual_task(bundle, config_path)
    except Exception as err:  # noqa: BLE001 - the flow already logged the traceback
        raise _fail(err) from None
    version = f"v{outcome.version}" if outcome.version is not None else "no version"
    console.print(f"{outcome.task}: [bold]{outcome.decision}[/] ({version}) by {outcome.decided_by}: {outcome.reason}")


def watch(
    once: Annotated[bool, typer.Option("--once", help="Handle what is in the inbox now, then exit.")] = False,
    inbox: Annotated[str | None, typer.Option(help="Local folder or s3://bucket/prefix/ (default: config).")] = None,
    interval: Annotated[int, typer.Option(help="Seconds between looks at the inbox.")] = 60,
    config: ConfigOpt = None,
) -> None:
    """Process new bundles of the inbox one at a time, oldest first (flow `watch-inbox`)."""
    _, config_path = _setup(config)
    from flows.watch import watch_inbox

    while True:
        try:
            outcomes = watch_inbox(config_path, inbox)
        except Exception as err:  # noqa: BLE001 - keep watching; the failed bundle is retried next time
            if once:
                raise _fail(err) from None
            console.print(f"[red]error:[/] {err}")
        else:
            for o in outcomes:
                console.print(f"{o.task}: [bold]{o.decision}[/] (v{o.version})")
        if once:
            return
        time.sleep(interval)


# ---------------------------------------------------------------------------- review
@review.command("list")
def review_list(config: ConfigOpt = None) -> None:
    """Candidates and expansion plans waiting for a reviewer."""
    cfg, _ = _setup(config)
    registry = _registry(cfg)
    table = Table("ref", "kind", "task", "builds on", "gate metrics", title="pending reviews")
    for v in registry.pending_reviews():
        metrics = ", ".join(f"{k} {x:.1f}" for k, x in v.gate.items())
        table.add_row(str(v.version), "version", v.task, f"v{v.parent_version or '-'}", metrics)
    for p in registry.pending_plans():
        table.add_row(p.tags.get("prefect_flow_run_name", p.run_id), "plan", p.task,
                      f"v{p.tags.get('parent_version', '-')}", "")
    console.print(table if table.row_count else "nothing waits for a review")
    champion = registry.aliases().get("champion")
    console.print(f"champion: {f'v{champion}' if champion else 'none yet'}")


@review.command("show")
def review_show(version: VersionArg, config: ConfigOpt = None) -> None:
    """Everything recorded about one version: lineage, decision, accuracy, metrics."""
    cfg, _ = _setup(config)
    from cmoe.registry import RegistryError

    registry = _registry(cfg)
    try:
        v = registry.version(version)
    except RegistryError as err:
        raise _fail(err) from None
    aliases = [a for a, n in registry.aliases().items() if n == version]
    console.print(f"[bold]v{v.version}[/] {v.task} {' '.join(f'@{a}' for a in aliases)}")
    console.print(f"bundle:    {v.bundle_uri} (sha256 {v.bundle_sha256[:16]}…)")
    console.print(f"builds on: {f'v{v.parent_version}' if v.parent_version else 'the base'}")
    console.print(f"decision:  {v.decision}" + (f" by {v.decided_by}: {v.reason}" if v.decided_by else ""))
    console.print(_matrix([v]))
    for name, values in (("metrics", v.metrics), ("gate", v.gate)):
        console.print(f"{name}: " + ", ".join(f"{k} {x:g}" for k, x in values.items()))


def _decide(ref: str, decision: Literal["approve", "reject"], by: str, reason: str, config: Path | None) -> None:
    cfg, _ = _setup(config)
    from cmoe.registry import RegistryError
    from flows.continual import submit_review

    try:
        console.print(submit_review(_registry(cfg), ref, decision, by, reason))
    except RegistryError as err:
        raise _fail(err) from None


@review.command("approve")
def review_approve(ref: RefArg, by: ByOpt, reason: ReasonOpt, config: ConfigOpt = None) -> None:
    """Approve: a version becomes champion; a plan gets trained. Resumes the waiting flow run."""
    _decide(ref, "approve", by, reason, config)


@review.command("reject")
def review_reject(ref: RefArg, by: ByOpt, reason: ReasonOpt, config: ConfigOpt = None) -> None:
    """Reject: the champion stays as it is. Resumes the waiting flow run."""
    _decide(ref, "reject", by, reason, config)


# ---------------------------------------------------------------------------- serving
def rollback(version: VersionArg, config: ConfigOpt = None) -> None:
    """Move `champion` back to an earlier approved version."""
    cfg, _ = _setup(config)
    from cmoe.registry import RegistryError

    try:
        previous = _registry(cfg).rollback(version)
    except RegistryError as err:
        raise _fail(err) from None
    console.print(f"champion: v{previous} -> v{version}")


def predict(
    image: Annotated[Path, typer.Option(help="Image file.", exists=True, dir_okay=False)],
    question: Annotated[str, typer.Option(help="Question about the image.")],
    model: Annotated[str | None, typer.Option(help="MLflow model URI (default: models:/<name>@champion).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer a question about an image with a registered model (its MLflow pyfunc)."""
    cfg, _ = _setup(config)
    from cmoe.registry import RegistryError

    try:
        uri = model or f"models:/{cfg.registry.model_name}@champion"
        row = _registry(cfg).predict(uri, [str(image)], [question])[0]
    except RegistryError as err:
        raise _fail(err) from None
    console.print(f"{row['answer']}  (task {row['task']}, confidence {row['confidence']:.2f})")


# ---------------------------------------------------------------------------- demo
def demo(
    train: Annotated[int, typer.Option(help="Training examples per synthetic task.")] = 1200,
    test: Annotated[int, typer.Option(help="Test examples per synthetic task.")] = 200,
    config: ConfigOpt = None,
) -> None:
    """Whole pipeline on coin-mini: synthesise the inbox, build the base, learn every task, report."""
    cfg, config_path = _setup(config)
    from cmoe.data.storage import is_s3, upload_bundle
    from cmoe.data.synth import synth_suite
    from cmoe.stages.pretrain import build_base
    from flows.watch import watch_inbox

    suite, inbox = cfg.home / "suite", cfg.inbox or str(cfg.home / "inbox")
    if not (suite / "pretrain" / "task.yaml").is_file():
        console.print(f"synthesising coin-mini into {suite} …")
        synth_suite(suite, seed=cfg.base.seed, n_train=train, n_test=test, n_pretrain=cfg.base.pretrain_samples)
    for bundle in sorted(p for p in suite.iterdir() if p.name != "pretrain" and (p / "task.yaml").is_file()):
        _deliver(bundle, inbox, upload_bundle if is_s3(inbox) else None)
    if cfg.base.path is None:
        console.print("building the base (cached after the first run) …")
        base = build_base(cfg.base, cfg.home / "base", corpus=suite / "pretrain", cache_dir=cfg.home / "cache")
        console.print(f"base {'reused' if base.reused else 'built'}: {base.params_total:,} params "
                      f"({base.wall_s:.0f} s)")
    try:
        watch_inbox(config_path, inbox)
    except Exception as err:  # noqa: BLE001 - report what was learned anyway
        console.print(f"[red]error:[/] {err}")
    registry = _registry(cfg)
    versions = registry.versions()
    console.print(_matrix(versions))
    champion = registry.aliases().get("champion")
    if champion:
        final = registry.version(champion)
        console.print(f"champion v{champion}: Avg {final.metrics.get('avg_acc', float('nan')):.1f} %, "
                      f"BWT {final.metrics.get('bwt', float('nan')):+.2f} points (backward transfer: "
                      f"below 0 = old tasks forgotten), params added per task: "
                      + ", ".join(f"{v.task} {int(v.metrics.get('params_added', 0)):,}"
                                  for v in registry.lineage(champion)))
    _print_ui_commands(cfg, registry.tracking_uri)
    if not champion:
        raise typer.Exit(1)


def _deliver(bundle: Path, inbox: str, upload) -> None:  # noqa: ANN001 - upload_bundle or None
    """Put one bundle into the inbox the way a writer must: complete, or not at all."""
    if upload is not None:
        upload(bundle, f"{inbox.rstrip('/')}/{bundle.name}/")
        return
    target = Path(inbox) / bundle.name
    if target.exists():
        return
    staging = Path(inbox) / f".{bundle.name}.incoming"  # dot-folders are invisible to the watcher
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle, staging)
    staging.rename(target)


def _matrix(versions: list) -> Table:  # noqa: ANN001 - list[VersionInfo]
    """Accuracy matrix (row: version, column: task T1..Tn) with Avg, BWT, params added and the decision."""
    tasks = list(dict.fromkeys(t for v in versions for t in v.acc))
    table = Table("version", "task", *(f"T{i + 1}" for i in range(len(tasks))), "Avg", "BWT", "params added",
                  "decision", title="accuracy (%) of every task learned so far",
                  caption="  ".join(f"T{i + 1} = {t}" for i, t in enumerate(tasks)))
    for v in versions:
        m = v.metrics
        table.add_row(
            f"v{v.version}", v.task, *(f"{v.acc[t]:.1f}" if t in v.acc else "" for t in tasks),
            f"{m['avg_acc']:.1f}" if "avg_acc" in m else "", f"{m['bwt']:+.1f}" if "bwt" in m else "",
            f"{int(m['params_added']):,}" if "params_added" in m else "", f"{v.decision} ({v.decided_by})")
    return table


def _tool(name: str) -> str:
    """A console script of this environment by full path (works without activating the venv)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _print_ui_commands(cfg: CmoeConfig, tracking_uri: str) -> None:
    """The exact commands that open the Prefect and MLflow UIs on these results (plain text: never wrapped)."""
    prefect_ui = os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
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
