"""The MLflow pyfunc face of a CMoE state: (image, question) rows in, answer + located task out.

The wrapper holds no tensors: `load_context` only notes where the logged safetensors state
directory lies and how to decode (the `eval` section recorded as the model's MLflow
`model_config`, plain JSON values a loader may override), and prediction hands both to
`cmoe.stages.predict.predict_rows`.

Served by `mlflow models serve`, a request's `image` is the encoded image file (PNG, JPEG, ...) as a
base64 string, which MLflow decodes to bytes because the column is `binary` (docs/orchestration.md,
"Serving the champion"): a request cannot name a file on the server. In process a path or a PIL
image passes too (MLflow leaves Python objects as they are).

Every row gets `cmoe predict`'s limits before any decoder or the model sees it: the image the
validator's checks (cmoe.data.validate: bytes, format, pixels, depth, decoding; a path is read as
`read_checked_image` reads it), the question its length, then its prompt the model's positions. A
request with a row that fails them is refused whole, naming every such row (numbered from 0, as in
the request's `data`) and its problem: an MlflowException INVALID_PARAMETER_VALUE, which a scoring
server answers with HTTP 400. Loading refuses a model whose code is not what was logged
(cmoe.registry.trusted_code, run by the model on itself).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from cmoe.config import CmoeConfig
from cmoe.registry.trusted_code import model_code_problem

STATE_ARTIFACT = "state"  # key of the state directory among the pyfunc's artifacts
OUTPUT_COLUMNS = ["answer", "task", "confidence", "margin"]
# `image` is binary: the scoring server base64-decodes it (a path or PIL image still passes in process).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "question")]),
    outputs=Schema([ColSpec("string", "answer"), ColSpec("string", "task"), ColSpec("double", "confidence"),
                    ColSpec("double", "margin")]),
)
SHOWN_PROBLEMS = 10  # problems named in one refusal (the rest are counted): the error stays one bounded line


def model_config(cfg: CmoeConfig) -> dict[str, Any]:
    """The pyfunc's MLflow `model_config`: the config's decoding settings (`eval`), as JSON values."""
    return cfg.eval.model_dump(mode="json")


def to_image(value: Any) -> Image.Image:
    """An RGB image from encoded bytes, a file path or a PIL image (in process: the caller decoded it);
    bytes and files pass the validator's image checks first, else ImageInputError says why."""
    from cmoe.data.bundle import IMAGE_FORMATS  # the data layer loads when a model answers, not with the registry
    from cmoe.data.validate import ImageInputError, image_bytes_problem, read_checked_image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
        if problem := image_bytes_problem(data):
            raise ImageInputError(problem)
    elif isinstance(value, str | Path):
        data = read_checked_image(value)
    else:
        raise ImageInputError(f"is {type(value).__name__}, not an encoded image file")
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
        return im.convert("RGB")


def refused(problems: list[tuple[int, str]], rows: int) -> MlflowException:
    """The request's refusal (HTTP 400 from a scoring server): which rows cannot be answered, and why."""
    named = "; ".join(f"row {i}: {why}" for i, why in problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return MlflowException.invalid_parameter_value(
        f"{len({i for i, _ in problems})} of {rows} rows cannot be answered, so none was: {named}{more}")


class CmoePyfunc(mlflow.pyfunc.PythonModel):
    """Answers a DataFrame with columns `image` (bytes; in process also a path or PIL image) and `question`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Check the model's code is what was logged, then remember the state directory MLflow
        materialised for it and its decoding settings."""
        self.state_dir = Path(context.artifacts[STATE_ARTIFACT])
        model_dir = next((p for p in self.state_dir.parents if (p / MLMODEL_FILE_NAME).is_file()), None)
        problem = (model_code_problem(model_dir, running=True) if model_dir
                   else f"its state {self.state_dir} lies in no MLflow model folder")
        if problem:
            raise MlflowException(f"refusing to load this cmoe model: {problem}")
        # Versions logged before the settings were recorded have none: the defaults then.
        self.cfg = CmoeConfig.model_validate({"eval": context.model_config or {}})

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per input: the answer, the task the locator picked, its confidence and its margin;
        an MlflowException (INVALID_PARAMETER_VALUE) naming every row that cannot be answered."""
        from cmoe.data.validate import ImageInputError, question_problem
        from cmoe.stages.predict import PromptTooLongError, predict_rows

        missing = {"image", "question"} - set(model_input.columns)
        if missing:
            raise MlflowException.invalid_parameter_value(
                f"input needs columns 'image' and 'question'; missing {sorted(missing)}")
        images, questions, problems = [], [], []
        for row, (image, question) in enumerate(zip(model_input["image"], model_input["question"])):
            try:
                images.append(to_image(image))
            except ImageInputError as err:  # a path's message starts with the path
                problems.append((row, f"image {err}" if isinstance(image, str | Path) else f"image: {err}"))
            if not isinstance(question, str):
                problems.append((row, f"question: is {type(question).__name__}, not text"))
            elif why := question_problem(question):
                problems.append((row, f"question: {why}"))
            questions.append(question)
        if problems:
            raise refused(problems, len(model_input))
        try:
            rows = predict_rows(self.cfg, self.state_dir, images, questions)
        except PromptTooLongError as err:
            raise refused([(i, f"question: {why}") for i, why in err.rows.items()], len(model_input)) from None
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
