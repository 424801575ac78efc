"""An MLflow tracking server that is down, or never answers, fails in bounded time with one line
naming it (its password redacted): never a hang on MLflow's default retries (7, up to 64 s apart,
120 s each).

Each test uses a free port with nothing listening (refused at once) or a socket that accepts and
never answers (`silent_port`); the limits are set small, and each test must return under pytest-timeout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.config import CmoeConfig
from cmoe.net import free_port
from cmoe.registry import Registry, RegistryError
from cmoe.registry.timeouts import ENV, worst_case_s

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _restore_mlflow_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's variables, which a Registry sets for the process, are back as they were after each test."""
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)


def registry_at(uri: str, tmp_path: Path, timeout_s: int = 2, retries: int = 0) -> Registry:
    return Registry(CmoeConfig(home=tmp_path / "home", registry={
        "tracking_uri": uri, "request_timeout_s": timeout_s, "request_retries": retries}))


def test_mlflow_requests_use_the_configured_timeout_and_retries(tmp_path: Path) -> None:
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)

    registry_at("http://127.0.0.1:1", tmp_path, timeout_s=7, retries=2)
    # what MLflow's HTTP client reads at every request
    assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(),
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()) == (7, 2, 2)


def test_the_default_mlflow_bound_is_under_a_minute() -> None:
    cfg = CmoeConfig().registry
    assert worst_case_s(cfg.request_timeout_s, cfg.request_retries) < 60  # MLflow's own: 7 retries of 120 s


def test_a_closed_tracking_port_fails_after_the_configured_tries_naming_the_server(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://ann:SENTINEL_PW_13@127.0.0.1:{free_port()}"  # nothing listens there
    reg = registry_at(uri, tmp_path, retries=1)
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"), pytest.raises(RegistryError) as err:
        reg.aliases()
    message = str(err.value)
    assert message.startswith(f"cannot read model 'cmoe' (aliases) from {uri.replace('SENTINEL_PW_13', '***')}: ")
    assert "Connection refused" in message and "after 2 tries" in message and "\n" not in message
    assert "SENTINEL_PW_13" not in message
    assert sum("Retrying" in r.getMessage() for r in caplog.records) == 1  # one retry, as configured


def test_a_tracking_server_that_never_answers_times_out(silent_port: int, tmp_path: Path) -> None:
    reg = registry_at(f"http://127.0.0.1:{silent_port}", tmp_path, timeout_s=1)
    with pytest.raises(RegistryError, match=rf"127\.0\.0\.1:{silent_port}: no answer \(Read timed out\) after 1 try"):
        reg.versions()


def test_a_missing_version_is_not_an_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"cannot read model 'cmoe' \(version 3\) from http://127\.0\.0\.1:"):
        registry_at(f"http://127.0.0.1:{free_port()}", tmp_path).version(3)
    with pytest.raises(RegistryError, match="model 'cmoe' has no version 3"):  # a registry that answers
        Registry(CmoeConfig(home=tmp_path / "sqlite")).version(3)


def test_review_list_on_a_closed_tracking_port_is_one_error_line(tmp_path: Path) -> None:
    uri = f"http://ann:SENTINEL_PW_13@127.0.0.1:{free_port()}"
    config = tmp_path / "down.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"),
                                      "registry": {"tracking_uri": uri, "request_retries": 0}}))
    result = CliRunner().invoke(app, ["review", "list", "--config", str(config)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read model 'cmoe'"), result.output
    assert "ann:***@127.0.0.1" in lines[0] and "SENTINEL_PW_13" not in result.output
