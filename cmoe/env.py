"""Process environment defaults: offline Hugging Face, telemetry off. Imported first by the CLI."""

import os

_DEFAULTS = {
    # No model or data downloads at run time: a missing local file must fail fast, not hang.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # Library progress bars (dataset casting, weight loading) drown the pipeline's own output.
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_defaults() -> None:
    """Set every default the user has not set explicitly."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
