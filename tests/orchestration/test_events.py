"""`cmoe data push` delivers a bundle whatever Prefect says: without a Prefect API, or with one that is
down, the bundle is complete in the inbox and the user is told no event was sent (the watcher picks
it up). A bundle that is invalid, or would replace another of the same name, is not pushed at all.
The push → event → flow run path on a real server: tests/production/test_events.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner, Result

from cmoe.cli import app
from cmoe.data.bundle import bundle_sha256
from cmoe.data.writer import deliver_bundle
from cmoe.net import free_port


def push(bundle: Path, inbox: Path) -> Result:
    return CliRunner().invoke(app, ["data", "push", str(bundle), str(inbox)])


def test_without_a_prefect_api_the_bundle_is_delivered_and_no_event_sent(suite: list[Path], tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server, no profile: Prefect's ephemeral mode
        result = push(suite[0], tmp_path / "inbox")
    assert result.exit_code == 0, result.output
    delivered = tmp_path / "inbox" / suite[0].name
    assert f"delivered: {delivered}" in result.output
    assert "not announced: no Prefect API configured (PREFECT_API_URL unset)" in result.output
    assert bundle_sha256(delivered) == bundle_sha256(suite[0])


def test_with_the_prefect_server_down_the_bundle_is_still_delivered(suite: list[Path], tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):  # nothing listens there
        result = push(suite[0], tmp_path / "inbox")
    assert result.exit_code == 0, result.output
    assert "not announced: the Prefect server did not take the event" in result.output
    assert (tmp_path / "inbox" / suite[0].name / "task.yaml").is_file()


def test_an_invalid_bundle_is_not_pushed(suite: list[Path], tmp_path: Path) -> None:
    bad = shutil.copytree(suite[0], tmp_path / "bad")
    next((bad / "test").rglob("*.png")).write_bytes(b"not a png")
    (tmp_path / "inbox").mkdir()
    result = push(bad, tmp_path / "inbox")
    assert result.exit_code == 1 and "invalid: 1 problem(s)" in result.output, result.output
    assert not any((tmp_path / "inbox").iterdir())


def test_a_bundle_never_replaces_another_of_the_same_name(suite: list[Path], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    first = Path(deliver_bundle(suite[0], inbox))
    other = shutil.copytree(suite[1], tmp_path / "other" / suite[0].name)  # another task under the same name
    result = push(other, inbox)
    assert result.exit_code == 1, result.output
    assert f"{first}: holds another bundle of that name" in result.output
    assert bundle_sha256(first) == bundle_sha256(suite[0])
