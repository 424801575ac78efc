"""An S3 endpoint that is down, or never answers, fails in bounded time with one line naming it:
never a hang on botocore's defaults (60 s to connect, 60 s per read, 5 tries).

Each test points `CMOE_S3_ENDPOINT_URL` at a free port with nothing listening (refused at once) or
at a socket that accepts and never answers (`silent_port`); the limits are set small, and each
test must return under pytest-timeout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.data.storage import S3Limits, StorageError, fetch_bundle, s3_client
from cmoe.net import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dead_s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The S3 test environment (dummy credentials), its endpoint moved to a closed port."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("CMOE_S3_ENDPOINT_URL", endpoint)
    return endpoint


def test_s3_clients_use_the_environments_limits(dead_s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMOE_S3_CONNECT_TIMEOUT_S", "1.5")
    monkeypatch.setenv("CMOE_S3_READ_TIMEOUT_S", "4")
    monkeypatch.setenv("CMOE_S3_MAX_ATTEMPTS", "2")
    config = s3_client().meta.config
    assert (config.connect_timeout, config.read_timeout, config.retries) == (
        1.5, 4.0, {"total_max_attempts": 2, "mode": "standard"})


def test_the_default_s3_bound_is_under_a_minute() -> None:
    assert S3Limits().worst_case_s() < 60  # botocore's own: 60 s connect + 60 s read, 5 tries


@pytest.mark.parametrize("value", ["0", "-1", "soon", "2.5", "inf"])
def test_a_bad_s3_limit_is_a_storage_error_naming_the_variable(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMOE_S3_MAX_ATTEMPTS", value)
    with pytest.raises(StorageError, match=f"CMOE_S3_MAX_ATTEMPTS='{value}': not a positive whole number"):
        s3_client()


def test_a_closed_s3_port_fails_after_the_configured_tries_naming_the_endpoint(
        dead_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CMOE_S3_MAX_ATTEMPTS", "2")
    with caplog.at_level(logging.DEBUG, logger="botocore.retries.standard"), pytest.raises(StorageError) as err:
        fetch_bundle("s3://inbox/bundle", cache_dir=tmp_path)
    assert str(err.value).startswith(f"s3://inbox/bundle/: no answer from the S3 endpoint {dead_s3} after 2 tries")
    assert sum(r.getMessage().startswith("Retry needed, retrying") for r in caplog.records) == 1
    assert not any(tmp_path.iterdir())  # nothing downloaded, no half-made cache folder


def test_an_s3_endpoint_that_never_answers_times_out(dead_s3: str, silent_port: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMOE_S3_ENDPOINT_URL", f"http://127.0.0.1:{silent_port}")
    monkeypatch.setenv("CMOE_S3_READ_TIMEOUT_S", "1")
    monkeypatch.setenv("CMOE_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=rf"127\.0\.0\.1:{silent_port} after 1 try .*Read timeout"):
        fetch_bundle("s3://inbox/bundle", cache_dir=tmp_path)


def test_data_validate_on_a_closed_s3_port_is_one_error_line(dead_s3: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "validate", "s3://inbox/bundle", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output  # the data commands' storage-error status
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://inbox/bundle/: no answer from the S3 endpoint "
                                                   f"{dead_s3} after 3 tries"), result.output
