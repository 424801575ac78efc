"""Event-driven arrival on a real Prefect server: `cmoe data push` → `cmoe.bundle.ready` → the trigger of
the `continual-task` deployment (deployed from prefect.yaml by `prefect deploy`) → a flow run of its
own for that bundle → a process worker runs it to its review, where the run suspends and the worker
exits (`flow.suspend_reviews`) → `cmoe review approve` starts it again → a second worker runs it to
the reviewer's decision; then the reconciling watcher announces a bundle that arrived without a
push, and only that one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cmoe.config import tiny_test_config
from flows.events import DEPLOYMENT

from .conftest import BIN, BUCKET, PREFECT_AUTH, Services, run_cli, wait_until

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[2]
INBOX = f"s3://{BUCKET}/events-inbox/"
RUN_CREATED_S = 60  # event → automation → flow run takes a second or two; more on a busy 2-core box


@dataclass
class Pushed:
    config: Path
    bundle: Path
    uri: str
    push: subprocess.CompletedProcess


@contextmanager
def prefect_client(services: Services) -> Iterator:
    """A Prefect client on the session's server (this process's own settings are left alone)."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(services.prefect_api, auth_string=PREFECT_AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def pushed(services: Services, tiny_suite: list[Path], tiny_base: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    """Deploy continual-task from prefect.yaml (its trigger included), then `cmoe data push` the first tiny bundle."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    root = tmp_path_factory.mktemp("events")
    cfg = tiny_test_config(root / "home").model_dump(mode="json")
    cfg["base"]["path"] = str(tiny_base)
    cfg["inbox"] = INBOX
    # MLflow in the home's SQLite: the other tests of this session count what the MLflow server holds
    cfg["flow"]["lineage_limit"] = "cmoe-events"  # and a lineage slot of its own on the shared Prefect server
    cfg["gate"]["require_review"] = True  # every candidate waits for a person ...
    cfg["flow"]["suspend_reviews"] = True  # ... in a suspended run, not in a worker's process
    config = root / "cmoe.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with prefect_client(services) as client:
        client.create_work_pool(WorkPoolCreate(name="cmoe", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "continual-task",
                             "--params", f'{{"config_path": "{config}"}}'],
                            env=services.env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    bundle = tiny_suite[0]
    push = run_cli(["data", "push", str(bundle), INBOX], services.env, root)
    yield Pushed(config, bundle, f"{INBOX}{bundle.name}/", push)
    with prefect_client(services) as client:  # no later event of this session starts a run
        client.delete_deployment(client.read_deployment_by_name(DEPLOYMENT).id)


def runs_by_bundle(services: Services) -> dict[str, list]:
    """{bundle_uri: the deployment's flow runs for it}."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with prefect_client(services) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.parameters["bundle_uri"], []).append(run)
    return found


def wait_for_run(services: Services, uri: str) -> dict[str, list]:
    """The deployment's runs by bundle, once one exists for `uri` (TimeoutError after RUN_CREATED_S)."""
    seen: dict[str, list] = {}

    def created() -> bool:
        seen.update(runs_by_bundle(services))
        return uri in seen

    wait_until(created, RUN_CREATED_S, f"a flow run of {DEPLOYMENT} for {uri}")
    return seen


def test_a_pushed_bundle_gets_its_own_run_of_the_deployment(services: Services, pushed: Pushed) -> None:
    assert pushed.push.returncode == 0, pushed.push.stdout + pushed.push.stderr
    assert f"delivered: {pushed.uri}" in pushed.push.stdout
    assert "announced: cmoe.bundle.ready" in pushed.push.stdout, pushed.push.stdout + pushed.push.stderr
    [run] = wait_for_run(services, pushed.uri)[pushed.uri]
    assert run.parameters == {"bundle_uri": pushed.uri, "config_path": str(pushed.config)}
    assert run.state.is_scheduled()  # waiting for a worker of pool `cmoe`


def run_worker_once(services: Services) -> str:
    """`prefect worker start --pool cmoe --run-once`: run what the pool has scheduled, then exit; its log tail."""
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "cmoe", "--run-once"],
                            env=services.env, cwd=ROOT, capture_output=True, text=True, timeout=540, check=False)
    log = worker.stdout[-3000:] + worker.stderr[-6000:]
    assert worker.returncode == 0, log
    return log


def registered(pushed: Pushed):  # noqa: ANN201 - an mlflow MlflowClient on the module's registry
    """An MLflow client on the registry of the module's config (SQLite in its home)."""
    from mlflow import MlflowClient

    tracking = f"sqlite:///{pushed.config.parent / 'home' / 'mlflow.db'}"
    return MlflowClient(tracking, registry_uri=tracking)


@pytest.mark.timeout(600)
def test_a_review_suspends_the_run_and_frees_the_worker(services: Services, pushed: Pushed) -> None:
    [run] = wait_for_run(services, pushed.uri)[pushed.uri]
    log = run_worker_once(services)  # it returns while the run waits: the review holds no process
    with prefect_client(services) as client:
        state = client.read_flow_run(run.id).state
        assert state.is_paused() and state.name == "Suspended", f"{state}\n{log}"
        keyset = state.state_details.run_input_keyset  # the ReviewInput form the Prefect UI shows
        assert set(json.loads(client.read_flow_run_input(run.id, keyset["schema"]))["properties"]) == {
            "decision", "by", "reason"}
        assert "cmoe review approve 1" in json.loads(client.read_flow_run_input(run.id, keyset["description"]))
    version = registered(pushed).get_model_version("cmoe", "1")
    assert version.tags["bundle_uri"] == pushed.uri and version.tags["decision"] == "pending_review"


@pytest.mark.timeout(600)
def test_an_approval_starts_it_again_to_the_reviewers_decision(services: Services, pushed: Pushed) -> None:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from cmoe.cli.common import open_registry
    from cmoe.config import load_config
    from flows.review import submit_review

    [run] = wait_for_run(services, pushed.uri)[pushed.uri]
    # What `cmoe review approve 1 --by ann` runs (the CLI itself is tested in tests/orchestration),
    # in this process: a second interpreter importing cmoe costs tens of seconds on the shared box.
    with temporary_settings({PREFECT_API_URL: services.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        answer = submit_review(open_registry(load_config(pushed.config)), "1", "approve", "ann", "no forgetting")
    assert "resumed" in answer, answer
    with prefect_client(services) as client:
        assert client.read_flow_run(run.id).state.is_scheduled()  # back in the pool's queue
    log = run_worker_once(services)
    with prefect_client(services) as client:
        assert client.read_flow_run(run.id).state.is_completed(), log
    registry = registered(pushed)
    version = registry.get_model_version("cmoe", "1")
    assert (version.tags["decision"], version.tags["decided_by"]) == ("approved", "ann")
    assert len(registry.search_model_versions("name = 'cmoe'")) == 1  # the restart registered no second candidate
    assert int(registry.get_model_version_by_alias("cmoe", "champion").version) == 1  # int over SQLite


def test_the_watcher_announces_only_a_bundle_that_arrived_another_way(
        services: Services, pushed: Pushed, tiny_suite: list[Path]) -> None:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from cmoe.data.storage import upload_bundle
    from flows.events import bundles_in_flight

    other = tiny_suite[1]
    with pytest.MonkeyPatch.context() as mp:  # dropped in by some other writer: no event
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "CMOE_S3_ENDPOINT_URL"):
            mp.setenv(key, services.env[key])
        uri = upload_bundle(other, f"{INBOX}{other.name}/")
    watch = subprocess.run(
        [sys.executable, "-c", f"from flows.watch import watch_inbox; watch_inbox({str(pushed.config)!r}, dispatch=True)"],
        env=services.env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-6000:]
    runs = wait_for_run(services, uri)
    assert [r.parameters["bundle_uri"] for r in runs[uri]] == [uri]
    assert len(runs[pushed.uri]) == 1, runs  # the decided bundle was not announced again
    # what the next scan skips: the bundle whose run now waits for a worker
    with temporary_settings({PREFECT_API_URL: services.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        assert bundles_in_flight() == {uri}
