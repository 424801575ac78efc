"""The MLflow pyfunc face of a CMoE state: (image, question) rows in, answer + located task out.

The wrapper holds no tensors: `load_context` only notes where the logged safetensors state
directory lies and how to decode (the `eval` section recorded as the model's MLflow
`model_config`, plain JSON values a loader may override), and prediction hands both to
`cmoe.stages.predict.predict_rows`.

Served by `mlflow models serve`, a request's `image` is the encoded image file (PNG, JPEG, ...) as a
base64 string, which MLflow decodes to bytes because the column is `binary` (docs/orchestration.md,
"Serving the champion"): a request cannot name a file on the server. In process a path or a PIL
image passes too (MLflow leaves Python objects as they are).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from cmoe.config import CmoeConfig

STATE_ARTIFACT = "state"  # key of the state directory among the pyfunc's artifacts
OUTPUT_COLUMNS = ["answer", "task", "confidence", "margin"]
# `image` is binary: the scoring server base64-decodes it (a path or PIL image still passes in process).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "question")]),
    outputs=Schema([ColSpec("string", "answer"), ColSpec("string", "task"), ColSpec("double", "confidence"),
                    ColSpec("double", "margin")]),
)


def model_config(cfg: CmoeConfig) -> dict[str, Any]:
    """The pyfunc's MLflow `model_config`: the config's decoding settings (`eval`), as JSON values."""
    return cfg.eval.model_dump(mode="json")


def to_image(value: Any) -> Image.Image:
    """An RGB image from a file path, raw encoded bytes or a PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    source = io.BytesIO(value) if isinstance(value, bytes | bytearray) else Path(value)
    with Image.open(source) as im:
        return im.convert("RGB")


class CmoePyfunc(mlflow.pyfunc.PythonModel):
    """Answers a DataFrame with columns `image` (path or bytes) and `question`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Remember the state directory MLflow materialised for this model and its decoding settings."""
        self.state_dir = Path(context.artifacts[STATE_ARTIFACT])
        # Versions logged before the settings were recorded have none: the defaults then.
        self.cfg = CmoeConfig.model_validate({"eval": context.model_config or {}})

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per input: the answer, the task the locator picked, its confidence and its margin."""
        from cmoe.stages.predict import predict_rows

        missing = {"image", "question"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input needs columns 'image' and 'question'; missing {sorted(missing)}")
        images = [to_image(v) for v in model_input["image"]]
        rows = predict_rows(self.cfg, self.state_dir, images, [str(q) for q in model_input["question"]])
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
