"""`cmoe tune --pilot BUNDLE... --out DIR`: choose `probe.tau_scale` on pilot data; write the config to run with.

A thin wrapper over cmoe.stages.tune (the sweep, the rule, the chart, the tuned config) that
builds the tiny base when none is configured and records the sweep as one MLflow run (tag
`cmoe.tune`) at the config's tracking URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from cmoe.cli.common import ConfigOpt, console, ensure_base, error, fail, load, open_registry


def tune(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    pilot: Annotated[list[str] | None, typer.Option(
        "--pilot", help="Pilot bundles in order (folders or s3://): --pilot B1 B2 ...")] = None,
    more: Annotated[list[str] | None, typer.Argument(help="The pilot bundles after the first.", metavar="BUNDLE",
                                                     show_default=False)] = None,
    grid: Annotated[str | None, typer.Option(
        "--grid", help="tau_scale values, comma-separated, e.g. 0.5,1,2 (default: tune.tau_scales).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Sweep probe.tau_scale over pilot bundles; write the config to run with.

    Each tau_scale of --grid (default: tune.tau_scales) learns the pilot
    bundles in order, as a throwaway lineage under OUT/points/. The chosen
    value adds the fewest parameters among those whose Avg is within
    tune.max_avg_drop points of the best Avg. Writes OUT/config.yaml (the
    --config file with probe.tau_scale set to it: `cmoe run --config` it),
    OUT/tune.md, OUT/tune.json and OUT/pareto.png (params added vs Avg),
    and logs them to MLflow.

    The locator temperature is not swept: the locator routes by argmin, so
    the temperature changes neither routing nor Avg, only the confidence
    and margin it reports.
    """
    bundles = [*(pilot or []), *(more or [])]
    if not bundles:
        error("give the pilot bundles: cmoe tune --pilot BUNDLE... --out DIR")
        raise typer.Exit(2)
    cfg = load(config)
    if grid is not None:
        try:
            cfg.tune.tau_scales = [float(x) for x in grid.split(",")]
        except ValidationError as err:  # refused by TuneConfig: a value <= 0, or one given twice
            error(f"--grid {grid!r}: {err.errors()[0]['msg'].removeprefix('Value error, ')}")
            raise typer.Exit(2) from None
        except ValueError:
            error(f"--grid {grid!r}: give comma-separated numbers > 0, e.g. 0.5,1,2")
            raise typer.Exit(2) from None
    from cmoe.data.bundle import BundleError
    from cmoe.data.validate import open_bundle
    from cmoe.stages.common import StageError
    from cmoe.stages.tune import run_tune, table

    try:
        opened = [open_bundle(uri, cache_dir=cfg.home / "cache") for uri in bundles]  # all checked before any work
        ensure_base(cfg)
        result = run_tune(cfg, opened, out, config)
    except (BundleError, StageError) as err:
        raise fail(err) from None
    run_id = open_registry(cfg).log_tuning(cfg.model_dump(mode="json"), result)
    console.print(table(result).markdown())
    typer.echo(f"\nchosen: {result.reason}\nwrote {result.config_yaml} (cmoe run --config {result.config_yaml})\n"
               f"MLflow run {run_id}: the table, {Path(result.pareto_png).name} and the config")


