"""A whole `cmoe run` with credentials everywhere they can come from records none of them: not in
MLflow (params, tags, metric keys, dataset inputs, model versions, artifacts), not in Prefect (the
flow run, its task runs, logs and artifacts, its persisted results), not in any file under the
home, not in the command's output, nor in what `cmoe demo` prints of the lineage.

tests/test_secrets.py checks the same for `cmoe doctor`, the expansion launcher and one run's params.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse
from uuid import UUID

import boto3
import pytest
import yaml

from cmoe.config import load_config
from cmoe.data.storage import s3_client, upload_bundle
from cmoe.net import free_port
from cmoe.registry import Registry

from .conftest import tiny_config_file, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

SERVER_PASSWORD = "SENTINEL_SERVER_PW_77"  # inside the tracking URI
SECRETS = {  # a sentinel per credential variable: moto accepts any AWS keys, so the run really uses these
    "AWS_ACCESS_KEY_ID": "SENTINELAKID0077", "AWS_SECRET_ACCESS_KEY": "SENTINEL_AWS_SECRET_77",
    "PREFECT_API_KEY": "SENTINEL_PREFECT_KEY_77", "PREFECT_API_AUTH_STRING": "admin:SENTINEL_PREFECT_AUTH_77",
    "MLFLOW_TRACKING_PASSWORD": "SENTINEL_MLFLOW_PW_77", "MLFLOW_TRACKING_TOKEN": "SENTINEL_MLFLOW_TOKEN_77",
}
SENTINELS = [SERVER_PASSWORD, *SECRETS.values()]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real MLflow tracking server (SQLite store) in its own folder: (its URL, the folder)."""
    folder, port = tmp_path / "mlflow-server", free_port()
    folder.mkdir()
    with (folder / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):  # noqa: S310 - a local test URL
                return True
        except OSError:
            return False

    try:
        wait_for(up, timeout=180, what="MLflow server")
        yield url, folder
    finally:  # the server and its worker: the process group this fixture started
        os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # a worker its leader left behind
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def mlflow_records(registry: Registry) -> Iterator[str]:
    """Everything MLflow holds of the lineage, as text: every run (params, tags, metric keys, dataset
    inputs, where its artifacts are), every logged model, every model version (tags, model card,
    source) and the registered model."""
    client = registry.client
    runs = client.search_runs([registry.experiment_id])
    assert {r.data.tags.get("cmoe.stage") for r in runs} >= {None, "probe", "expand"}  # the parent and its stages
    for run in runs:
        yield json.dumps(run.to_dictionary(), default=str)
        yield json.dumps([(i.dataset.name, i.dataset.source, i.dataset.profile) for i in run.inputs.dataset_inputs])
    for model in client.search_logged_models([registry.experiment_id]):
        yield json.dumps(model.to_dictionary(), default=str)
    versions = client.search_model_versions(f"name = '{registry.model_name}'")
    assert versions
    for mv in versions:
        yield json.dumps(dict(mv), default=str)
    yield json.dumps(dict(client.get_registered_model(registry.model_name)), default=str)


def prefect_records(flow_run_id: UUID) -> Iterator[str]:
    """Everything the Prefect API holds of one flow run, as text: the run, its task runs, every log line
    (flushed first: logs are sent in the background) and every artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        yield client.read_flow_run(flow_run_id).model_dump_json()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert {t.name.split("-")[0] for t in tasks} >= {"fetch", "probe", "expand", "gate"}
        yield from (t.model_dump_json() for t in tasks)
        logs, page = [], None
        while page != []:  # the API answers at most a page of lines at a time
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=len(logs))
            logs += page
        assert any("Finished in state Completed" in log.message for log in logs)
        yield from (log.model_dump_json() for log in logs)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        assert {a.key for a in artifacts} >= {"cmoe-mlflow-run", "cmoe-model-version", "cmoe-decision"}
        yield from (a.model_dump_json() for a in artifacts)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_a_whole_run_records_and_prints_no_credential(
        suite: list[Path], s3_endpoint: str, base_dir: Path, mlflow_server: tuple[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        cli: Callable[..., str]) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")  # MLflow's client sends these as basic auth
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # MLflow's default, restored afterwards
    caplog.set_level(logging.INFO)  # every library's log records of the run
    server, server_folder = mlflow_server
    home = tmp_path / "home"
    config_path = tiny_config_file(tmp_path, base_dir, "secret")
    config = yaml.safe_load(Path(config_path).read_text())
    # The server's password in the tracking URI (a server without auth ignores it): the MLflow UI
    # links of the Prefect artifacts are made from it too.
    with_password = server.replace("http://", f"http://ann:{SERVER_PASSWORD}@")
    config["registry"]["tracking_uri"] = with_password
    Path(config_path).write_text(yaml.safe_dump(config))
    s3_client().create_bucket(Bucket="secrets")
    uri = upload_bundle(suite[0], f"s3://secrets/new/{suite[0].name}/")

    output = cli("run", uri, "--config", config_path)

    assert "approved (v1)" in output
    registry = Registry(load_config(config_path))
    version = registry.version(1)
    assert version.bundle_uri == uri  # learned from S3 with the sentinel keys
    prefect = list(prefect_records(UUID(version.tags["prefect_flow_run_id"])))
    assert any("ann:***@127.0.0.1" in text for text in prefect)  # the MLflow links, password hidden
    texts = [output, *mlflow_records(registry), *prefect]
    for run in registry.client.search_runs([registry.experiment_id]):  # artifacts: in the files grepped below
        assert Path(urlparse(run.info.artifact_uri).path).is_relative_to(home)
    # the home, the MLflow server's store and log, and Prefect's persisted results
    written = files_under(home) + files_under(server_folder) + files_under(Path(os.environ["PREFECT_HOME"]))
    assert {"mlflow.db", "server.log", "MLmodel", "cmoe.json", "done.json"} <= {p.name for p in written}

    monkeypatch.setenv("PREFECT_API_URL", f"http://admin:{SERVER_PASSWORD}@prefect.internal/api")  # a server's, for demo
    from cmoe.cli.pipeline import print_results

    assert print_results(load_config(config_path))  # what `cmoe demo` prints of the lineage it learned
    captured = capfd.readouterr()
    assert "champion v1" in captured.out and server.replace("http://", "http://ann:***@") in captured.out
    assert "admin:***@prefect.internal" in captured.out
    # the run's S3 clients resolve their keys as this does: the sentinels were the keys it used
    assert boto3.Session().get_credentials().access_key == SECRETS["AWS_ACCESS_KEY_ID"]
    texts += [captured.out, captured.err, caplog.text]

    for secret in SENTINELS:
        for text in texts:
            assert secret not in text, (secret, text[max(0, text.find(secret) - 300):text.find(secret) + 100])
        for path in written:
            assert secret.encode() not in path.read_bytes(), (secret, path)
