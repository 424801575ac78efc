"""No credential reaches output, MLflow params, error messages or files written: one redaction for all.

Also: the compose stack refuses to start with the example passwords of infra/env/*.env.example.
"""

from __future__ import annotations

import json
import os
import subprocess
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


# ---------------------------------------------------------------------------- credentials in the environment
SECRETS = {  # a sentinel value per credential variable cmoe's services read
    "AWS_ACCESS_KEY_ID": "SENTINELAKID0042", "AWS_SECRET_ACCESS_KEY": "SENTINEL_AWS_SECRET_42",
    "PREFECT_API_KEY": "SENTINEL_PREFECT_KEY_42", "MLFLOW_TRACKING_PASSWORD": "SENTINEL_MLFLOW_PW_42",
    "MLFLOW_TRACKING_TOKEN": "SENTINEL_MLFLOW_TOKEN_42",
}
DB_URI = f"postgresql+psycopg2://cmoe:{SENTINEL}@db.internal:5432/mlflow"  # a tracking URI with its DB password


def test_credential_values_and_assignments_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    text = f"denied for key {SECRETS['AWS_ACCESS_KEY_ID']} (token {SECRETS['MLFLOW_TRACKING_TOKEN']})"
    assert redact_uri(text) == "denied for key *** (token ***)"
    assert redact_uri("PREFECT_API_KEY=pnu_other AWS_SECRET_ACCESS_KEY: 'x1y2z3w4'") == \
        "PREFECT_API_KEY=*** AWS_SECRET_ACCESS_KEY: '***'"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # too short to be a real key: ordinary words survive
    assert redact_uri("integration testing") == "integration testing"


def test_no_credential_reaches_output_params_or_files(tmp_path: Path, tiny_suite: list[Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Sentinels in every credential variable and a DB password in the tracking URI: `cmoe doctor`,
    the expansion launcher's files and environment, and one MLflow run's params hold none of them."""
    from cmoe.config import CmoeConfig
    from cmoe.data.validate import open_bundle
    from cmoe.registry import Registry
    from cmoe.stages.launch import launcher_env, write_inputs

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    home = tmp_path / "home"
    secret_cfg = {"home": str(home), "registry": {"tracking_uri": DB_URI, "ui_url": f"http://ann:{SENTINEL}@ui/"}}
    config = tmp_path / "secret.yaml"
    config.write_text(yaml.safe_dump({**secret_cfg, "registry": {
        "tracking_uri": f"http://ann:{SENTINEL}@127.0.0.1:{free_port()}/"}}))
    outputs = [CliRunner().invoke(app, ["doctor", "--timeout", "2", "--config", str(config), *json_flag]).output
               for json_flag in ([], ["--json"])]

    cfg = CmoeConfig.model_validate(secret_cfg)
    args = write_inputs(cfg, open_bundle(tiny_suite[0], cache_dir=home / "cache"), None, None, home / "runs" / "x",
                        eval_set=None, copy_base=True, variant="cmoe")
    env = launcher_env()
    assert {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == {  # a rank may read S3
        k: SECRETS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    outputs += [" ".join(args), json.dumps({k: v for k, v in env.items() if not k.startswith("AWS_")})]

    registry = Registry(CmoeConfig(home=home))  # sqlite under home: everything it writes is grepped below
    run_id = registry.start_task_run("key", "task", "sha", None, cfg.model_dump(mode="json"))
    params = registry.client.get_run(run_id).data.params
    assert params["registry.tracking_uri"] == "postgresql+psycopg2://cmoe:***@db.internal:5432/mlflow"
    outputs.append(json.dumps(params))

    written = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.name == "mlflow.db" for p in written)
    for secret in [SENTINEL, *SECRETS.values()]:
        for out in outputs:
            assert secret not in out, (secret, out[:2000])
        for path in written:
            assert secret.encode() not in path.read_bytes(), (secret, path)


# ---------------------------------------------------------------------------- the compose stack
REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())


def check_secrets(env_files: list[Path]) -> subprocess.CompletedProcess:
    """Run the compose file's check-secrets script (compose's `$$` is a literal `$`) with `env_files`' variables."""
    env = {"PATH": os.environ["PATH"]}
    for file in env_files:
        for line in file.read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
    script = COMPOSE["services"]["check-secrets"]["command"][0].replace("$$", "$")
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_the_compose_stack_refuses_to_start_with_the_example_passwords(tmp_path: Path) -> None:
    examples = sorted((REPO / "infra" / "env").glob("*.env.example"))
    refused = check_secrets(examples)
    assert refused.returncode != 0
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING"):
        assert f"refusing to start: {name} is unset or still its example value" in refused.stderr
    assert "changeme0" not in refused.stdout + refused.stderr  # names what to change, never a value

    own = tmp_path / "own.env"  # what a user puts into infra/env/<name>.env
    own.write_text("POSTGRES_PASSWORD=Pg7x\nMINIO_ROOT_PASSWORD=Mn7x\nAWS_SECRET_ACCESS_KEY=Mn7x\n"
                   "PREFECT_SERVER_API_AUTH_STRING=admin:Pf7x\nPREFECT_API_AUTH_STRING=admin:Pf7x\n")
    assert check_secrets([*examples, own]).returncode == 0


def test_every_service_of_the_stack_waits_for_the_secrets_check() -> None:
    services = COMPOSE["services"]
    check = services["check-secrets"]
    assert {e["path"] for e in check["env_file"]} >= {f"env/{n}.env{x}" for n in ("postgres", "minio", "s3", "prefect")
                                                     for x in ("", ".example")}

    def upstream(name: str) -> set[str]:
        found = set()
        for dep, how in services[name].get("depends_on", {}).items():
            if dep == "check-secrets":
                assert how["condition"] == "service_completed_successfully", name
            found |= {dep} | upstream(dep)
        return found

    assert all("check-secrets" in upstream(name) for name in services if name != "check-secrets")
