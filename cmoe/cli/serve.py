"""`cmoe predict`: answer with a registered model, the way a serving process would.

Its inputs get the task-bundle validator's limits before any decoder or model sees them
(cmoe.data.validate): the image must be a regular file (a FIFO is refused, never read) of a
supported raster format (never EPS/PS), within the byte and pixel limits by its header, 8 bits per
channel and decodable; the question must be non-empty, within the characters a bundle row may hold
and, for a registry version, short enough that its prompt and answer fit the model's positions.

The answer comes with the task the locator picked, its confidence and its margin over the
second-best task; a margin below `gate.min_locator_margin` is flagged UNSURE (the rows a serving
system should alert on or send to a person).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cmoe.cli.common import ConfigOpt, console, fail, open_registry, setup

if TYPE_CHECKING:
    from cmoe.config import CmoeConfig
    from cmoe.registry import Registry

_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))/?")


def predict(
    image: Annotated[Path, typer.Option(help="Image file.", exists=True, dir_okay=False)],
    question: Annotated[str, typer.Option(help="Question about the image.")],
    model: Annotated[str | None, typer.Option(help="MLflow model URI (default: models:/<name>@champion).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer a question about an image with a registered model (its MLflow pyfunc)."""
    cfg, _ = setup(config)
    from cmoe.data.validate import ImageInputError, question_problem, read_checked_image

    if problem := question_problem(question):
        raise fail(f"--question: {problem}")
    try:
        data = read_checked_image(image)  # the checked bytes are what the model gets: no second read
    except ImageInputError as err:
        raise fail(f"--image {err}") from None
    from cmoe.registry import RegistryError

    try:
        registry = open_registry(cfg)
        uri = model or f"models:/{cfg.registry.model_name}@champion"
        if problem := _prompt_problem(cfg, registry, uri, data, question):
            raise fail(f"--question: {problem}")
        row = registry.predict(uri, [data], [question])[0]
    except RegistryError as err:
        raise fail(err) from None
    console.print(answer_line(row, cfg.gate.min_locator_margin), markup=False, highlight=False)


def answer_line(row: dict, min_margin: float) -> str:
    """The answer and how it was routed; UNSURE when the locator's margin is below `min_margin`."""
    if row.get("task") is None:  # a single-router model: no locator, nothing to be unsure about
        return str(row["answer"])
    margin = row["margin"]
    line = f"{row['answer']}  (task {row['task']}, confidence {row['confidence']:.2f}, margin {margin:.2f})"
    if margin < min_margin:
        line += f"  UNSURE: the locator's margin is below gate.min_locator_margin {min_margin:.2f}"
    return line


def _prompt_problem(cfg: CmoeConfig, registry: Registry, uri: str, image: bytes, question: str) -> str | None:
    """Why the question's prompt exceeds the model's positions, or None; only checked for a version
    of this registry (another URI is left to its loader)."""
    m = _REGISTRY_URI.fullmatch(uri)
    if m is None or m["name"] != registry.model_name:
        return None
    version = int(m["version"]) if m["version"] else registry.aliases().get(m["alias"])
    if version is None:
        return None  # no such alias: loading the model reports it
    from cmoe.stages.predict import prompt_problem

    return prompt_problem(cfg, registry.state_dir(version), image, question)
