"""Is the configured MLflow usable from here? Read-only checks of tracking, the model registry, the artifact store.

For `cmoe doctor`, so unlike `Registry` (which creates its database folder and experiment on
first use) nothing is written: a missing local database is reported as "created on the first
run". Each check returns a one-line description or raises RegistryError saying what is wrong;
requests have a short timeout and no retries; credentials are named by the variable they come
from, never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from cmoe.config import CmoeConfig
from cmoe.registry import RegistryError, tracking_uri
from cmoe.registry.timeouts import limit_requests


def _limit_requests(timeout: float) -> None:
    # A check reports a dead service in `timeout` seconds: one try, no back-off.
    limit_requests(max(1, int(timeout)), 0)


def _auth() -> tuple[tuple[str, str] | None, dict[str, str], str]:
    """(basic auth, headers, description) the MLflow client would send, from its standard variables."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return (user, password), {}, "MLFLOW_TRACKING_USERNAME/PASSWORD"
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return None, {"Authorization": f"Bearer {token}"}, "MLFLOW_TRACKING_TOKEN"
    return None, {}, "no auth"


def _remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _no_database_yet(uri: str) -> bool:
    """The embedded default before its first run: the SQLite file does not exist (and is not created here)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def check_tracking(cfg: CmoeConfig, timeout: float) -> str:
    """Tracking: the server's version and auth (remote), then a one-experiment search."""
    _limit_requests(timeout)
    uri = tracking_uri(cfg)
    if _no_database_yet(uri):
        return f"{uri} (embedded default; created on the first run)"
    where = uri
    if _remote(uri):
        basic, headers, auth = _auth()
        try:
            r = requests.get(f"{uri.rstrip('/')}/version", auth=basic, headers=headers, timeout=timeout)
        except requests.RequestException as err:
            raise RegistryError(f"{uri}: not reachable: {err}") from None
        if r.status_code in (401, 403):
            raise RegistryError(f"{uri}: reachable, but {r.status_code} with {auth} "
                                "(set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)")
        r.raise_for_status()
        where = f"{uri} server {r.text.strip()}, auth: {auth}"
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return where


def check_model(cfg: CmoeConfig, timeout: float) -> str:
    """Model registry: a one-model search, then the configured model and its aliases."""
    _limit_requests(timeout)
    uri = tracking_uri(cfg)
    if _no_database_yet(uri):
        return "embedded default; nothing registered yet"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models(max_results=1)
    name = cfg.registry.model_name
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return f"model {name!r} not registered yet"
        raise
    aliases = ", ".join(f"@{a} v{v}" for a, v in sorted((model.aliases or {}).items())) or "no aliases"
    return f"model {name!r}: {aliases}"


def check_artifacts(cfg: CmoeConfig, timeout: float) -> tuple[str, str]:
    """Artifact store: (root, description) of where new runs of the experiment write, after listing it."""
    _limit_requests(timeout)
    uri = tracking_uri(cfg)
    experiment = None if _no_database_yet(uri) else MlflowClient(tracking_uri=uri).get_experiment_by_name(
        cfg.registry.experiment)
    if experiment is not None:
        root, source = experiment.artifact_location, f"experiment {cfg.registry.experiment!r}"
    elif cfg.registry.artifact_location:
        root, source = cfg.registry.artifact_location, "registry.artifact_location"
    else:
        root, source = (cfg.home / "mlartifacts").resolve().as_uri(), "default <home>/mlartifacts"
    if _remote(uri) and root.startswith(("file:", "/")):
        raise RegistryError(f"{root} ({source}) is a local path of this machine while tracking is remote: other "
                            "machines cannot read it; set registry.artifact_location to mlflow-artifacts:/<path> "
                            "(the server's --artifacts-destination) or s3://bucket/prefix")
    if root.startswith("file:") and not Path(root.removeprefix("file://")).exists():
        return root, f"{root} ({source}; created on the first run)"
    get_artifact_repository(root, tracking_uri=uri).list_artifacts()
    via = "; proxied by the tracking server (clients need no store credentials)" if root.startswith(
        "mlflow-artifacts:") else ""
    return root, f"{root} ({source}){via}"
