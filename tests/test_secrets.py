"""A password inside a URI never reaches output, MLflow params or error messages: one redaction for all."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.net import free_port
from cmoe.redact import redact_uri

SENTINEL = "SENTINEL_PW_42"


@pytest.mark.parametrize("uri, shown", [
    (f"http://ann:{SENTINEL}@127.0.0.1:5000/", "http://ann:***@127.0.0.1:5000/"),
    (f"postgresql+psycopg://cmoe:{SENTINEL}@db:5432/mlflow", "postgresql+psycopg://cmoe:***@db:5432/mlflow"),
    ("http://127.0.0.1:5000/", "http://127.0.0.1:5000/"),  # nothing to hide
    ("sqlite:////home/x/mlflow.db", "sqlite:////home/x/mlflow.db"),
])
def test_a_uri_keeps_its_user_and_host_and_loses_its_password(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_every_uri_in_a_message_is_redacted() -> None:
    text = f"cannot reach http://a:{SENTINEL}@h1/ nor s3://k:{SENTINEL}x@h2/b (retry later)"
    assert redact_uri(text) == "cannot reach http://a:***@h1/ nor s3://k:***@h2/b (retry later)"


def test_doctor_never_prints_the_password_of_the_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what the doctor sets for its process,
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # restored for the rest of this session
    config = tmp_path / "secret.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), "registry": {
        "tracking_uri": f"http://ann:{SENTINEL}@127.0.0.1:{free_port()}/"}}))  # nothing listens there
    for args in (["doctor", "--timeout", "2"], ["doctor", "--timeout", "2", "--json"]):
        result = CliRunner().invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 1, result.output  # the tracking check fails ...
        assert SENTINEL not in result.output and "ann:***@127.0.0.1" in result.output  # ... and says where
