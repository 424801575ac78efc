"""The `cmoe` command line: thin Typer wrappers over the data, model, stages, registry and flows."""

from cmoe.env import apply_defaults

apply_defaults()

import typer  # noqa: E402

from cmoe.cli import (  # noqa: E402
    base, compact, data, doctor, lineage, pipeline, resources, retire, review, serve, stages, tune)

app = typer.Typer(
    name="cmoe",
    help="Continual mixture-of-experts for vision-language models: learn new tasks, forget none.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
app.add_typer(data.app, name="data", help="Task bundles: synthesise, validate, inspect.")
app.add_typer(base.app, name="base", help="The frozen vision-language base: build, inspect.")
app.add_typer(review.app, name="review", help="Candidates and plans awaiting a decision: list, show, approve, reject.")
for command in (pipeline.run, pipeline.watch, retire.retire, compact.compact, review.rollback, lineage.lineage,
                serve.predict, pipeline.demo):
    app.command()(command)
for command in (stages.probe, stages.expand, stages.evaluate, stages.bench, tune.tune):
    app.command()(command)
app.command()(doctor.doctor)
app.command()(resources.plan_resources)
