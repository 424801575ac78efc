"""`cmoe data validate` / `info`: exit codes and output a script can rely on."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.data.bundle import bundle_sha256

runner = CliRunner()


def test_validate_valid_bundle_prints_name_counts_and_hash(bundle: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(bundle)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["name: tiny-color", "train: 4", "test: 3", f"sha256: {bundle_sha256(bundle)}"]


def test_validate_invalid_bundle_exits_1_and_prints_every_problem(bundle: Path) -> None:
    (bundle / "test/images/1.png").write_bytes(b"junk")
    (bundle / "task.yaml").write_text("name: Bad Name!\ndescription: x\nformat_version: 1\nmetric: exact_match\n")
    result = runner.invoke(app, ["data", "validate", str(bundle)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("task.yaml:1: name 'Bad Name!' must match")
    assert lines[1].startswith("test/images/1.png: cannot decode image")
    assert "invalid: 2 problem(s)" in result.stderr


def test_info_describes_the_bundle(make_bundle) -> None:
    root = make_bundle(layout="parquet")
    result = runner.invoke(app, ["data", "info", str(root)])
    assert result.exit_code == 0, result.output
    assert "metric:         exact_match" in result.stdout
    assert "train:          4 rows (parquet)" in result.stdout


def test_unreachable_storage_exits_2(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CMOE_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = runner.invoke(app, ["data", "validate", "s3://bucket/b/", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "error: s3://bucket/b/" in result.stderr and "s3cr3t" not in result.output
