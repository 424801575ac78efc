"""`cmoe predict`: answer with a registered model, the way a serving process would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmoe.cli.common import ConfigOpt, console, fail, open_registry, setup


def predict(
    image: Annotated[Path, typer.Option(help="Image file.", exists=True, dir_okay=False)],
    question: Annotated[str, typer.Option(help="Question about the image.")],
    model: Annotated[str | None, typer.Option(help="MLflow model URI (default: models:/<name>@champion).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer a question about an image with a registered model (its MLflow pyfunc)."""
    cfg, _ = setup(config)
    from cmoe.registry import RegistryError

    try:
        uri = model or f"models:/{cfg.registry.model_name}@champion"
        row = open_registry(cfg).predict(uri, [str(image)], [question])[0]
    except RegistryError as err:
        raise fail(err) from None
    console.print(f"{row['answer']}  (task {row['task']}, confidence {row['confidence']:.2f})")
