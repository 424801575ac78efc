"""`cmoe probe | expand | evaluate | bench`: the continual-learning stages, one command each."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from cmoe.cli.common import ConfigOpt, console, ensure_base, error, fail, load

ParentOpt = Annotated[Path | None, typer.Option("--parent", help="CMoE state to build on (default: the base).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]


def _print(result: object) -> None:
    console.print_json(json.dumps(asdict(result), default=str))


def _open(cfg, uri: str):  # noqa: ANN001, ANN202 - CmoeConfig -> ValidatedBundle (imports kept lazy)
    """The bundle validated once, or a clean error listing its problems."""
    from cmoe.data.bundle import BundleError
    from cmoe.data.validate import open_bundle

    try:
        return open_bundle(uri, cache_dir=cfg.home / "cache")
    except BundleError as err:
        raise fail(err) from None


def probe(bundle: Annotated[str, typer.Argument(help="Task bundle (folder or s3://).")],
          out: OutOpt, parent: ParentOpt = None, config: ConfigOpt = None) -> None:
    """PGKE: train probe experts briefly and write the per-layer expansion plan."""
    cfg = load(config)  # before the stages' imports: a bad config fails in a moment, not after torch loads
    from cmoe.data.guard import RehearsalError
    from cmoe.stages.common import StageError
    from cmoe.stages.probe import run_probe

    opened = _open(cfg, bundle)
    try:
        _print(run_probe(cfg, opened, parent, out))
    except (RehearsalError, StageError) as err:
        raise fail(err) from None


def expand(bundle: Annotated[str, typer.Argument(help="Task bundle (folder or s3://).")],
           plan: Annotated[Path, typer.Option("--plan", help="probe.json written by `cmoe probe`.")],
           out: OutOpt, parent: ParentOpt = None, config: ConfigOpt = None) -> None:
    """Grow the planned experts, train them + the task router with DeepSpeed, fit the locator; the new
    state references the task's evaluation set, kept in `data.eval_store` (what `cmoe evaluate` reads)."""
    cfg = load(config)
    from cmoe.data.guard import RehearsalError
    from cmoe.stages.common import StageError, keep_task_eval_set
    from cmoe.stages.expand import run_expand
    from cmoe.stages.probe import ProbeReport

    report = ProbeReport(**json.loads(plan.read_text()))
    opened = _open(cfg, bundle)
    kept = keep_task_eval_set(cfg, opened)
    try:
        _print(run_expand(cfg, opened, parent, report, out, eval_set=kept))
    except (RehearsalError, StageError) as err:
        raise fail(err) from None


def evaluate(state: Annotated[Path, typer.Argument(help="CMoE state directory.")],
             out: OutOpt, config: ConfigOpt = None) -> None:
    """Re-test every task the state learned on its kept evaluation set (locator and oracle routing).

    Only the final accuracy row is known here (no earlier rows): Avg is its mean; BWT needs the
    lineage's history and is reported by the flow (`cmoe review show`)."""
    cfg = load(config)
    from cmoe.data.evalsets import EvalSetError
    from cmoe.stages.common import StageError
    from cmoe.stages.evaluate import run_evaluate

    try:
        _print(run_evaluate(cfg, state, out, []))
    except (EvalSetError, StageError) as err:
        raise fail(err) from None


def bench(
    out: OutOpt,
    suite: Annotated[str | None, typer.Option("--suite", help="Synthetic suite to generate (coin-mini).")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Bundles in order, comma-separated.")] = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods.")] = "cmoe,naive-expand,single-router,seq-ft,joint",
    base: Annotated[Path | None, typer.Option("--base", help="Base checkpoint (default: build/reuse the tiny base).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic suite.")] = 0,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Training seeds (expand.seed), comma-separated, e.g. 0,1,2: mean and range per method.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train the task sequence with each method and write results.json, results.md and plots."""
    if (suite is None) == (tasks is None):
        error("give exactly one of --suite or --tasks")
        raise typer.Exit(2)
    try:
        seed_list = None if seeds is None else [int(x) for x in seeds.split(",")]
    except ValueError:
        error(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2")
        raise typer.Exit(2) from None
    cfg = load(config)
    from cmoe.data.synth import synth_suite
    from cmoe.stages.bench import bundles_in, run_bench

    if base is not None:
        cfg.base.path = str(base)
    ensure_base(cfg)
    if suite is not None:
        folder = out / "suite"
        if not folder.exists():
            synth_suite(folder, suite=suite, seed=seed)
        bundles = bundles_in(folder)
    else:
        bundles = tasks.split(",")
    run_bench(cfg, bundles, [m.strip() for m in methods.split(",")], out, seeds=seed_list)
    console.print((out / "results.md").read_text())
    console.print(f"wrote {out / 'results.json'}")
