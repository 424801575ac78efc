"""`cmoe doctor`: is this machine ready to run cmoe against the configured services?

One line per check, each OK, FAIL (with the reason) or SKIP (not configured: the embedded default
is used instead). Checks: package versions, the compute device and the DeepSpeed config it
resolves to, the DeepSpeed launcher, the Prefect API (reachability, then auth), MLflow tracking and
the model registry, the MLflow artifact store, and the task inbox (local folder or S3).

Nothing is written anywhere: every service check is a read (health, version, a one-item listing).
Secrets are never printed: credentials are named by where they come from, not by their value.
Every network call has a short timeout and no retries, so a dead service fails in seconds.
"""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from cmoe.config import CmoeConfig

Status = Literal["OK", "FAIL", "SKIP"]
PACKAGES = ("torch", "transformers", "deepspeed", "prefect", "mlflow", "boto3", "cmoe")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str


class CheckFailed(Exception):
    """Raised inside a check: its message is the reason printed after FAIL."""


def _short(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line (MLflow and botocore messages can span pages)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _run(name: str, fn: Callable[[], tuple[Status, str] | str], told: tuple[type[Exception], ...] = ()) -> Check:
    """Run one check; CheckFailed (or one of `told`: errors whose message is the reason) becomes FAIL
    with its message, any other exception FAIL with its type and message."""
    try:
        out = fn()
    except (CheckFailed, *told) as err:
        return Check(name, "FAIL", _short(err, 600))
    except Exception as err:  # noqa: BLE001 - a doctor reports every failure, it does not crash on one
        return Check(name, "FAIL", f"{type(err).__name__}: {_short(err)}")
    status, detail = ("OK", out) if isinstance(out, str) else out
    return Check(name, status, detail)


# ---------------------------------------------------------------------------- local machine
def versions() -> dict[str, str]:
    """Python and the stack's package versions ("missing" when a package is not installed)."""
    found = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "missing"
    return found


def check_versions() -> Check:
    """FAIL when a package cmoe needs at run time is not installed."""
    found = versions()
    missing = [k for k, v in found.items() if v == "missing"]
    detail = " ".join(f"{k} {v}" for k, v in found.items())
    return Check("versions", "FAIL" if missing else "OK", detail)


def check_device(cfg: CmoeConfig) -> Check:
    """GPU (CUDA, bf16 support) or CPU, and the DeepSpeed config the expansion will use on it."""

    def probe() -> str:
        import torch

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs its accelerator choice to stdout on import
            from cmoe.stages.trainer import resolve_config

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0)
            device, what = "cuda", f"GPU: {n} x {name}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        else:
            device, what = "cpu", f"CPU: {os.cpu_count()} cores, no GPU (fp32)"
        try:
            ds = resolve_config(cfg.expand.deepspeed_config, device)
        except FileNotFoundError as err:
            raise CheckFailed(f"{what}; expand.deepspeed_config: {err}") from None
        return f"{what}; expand.deepspeed_config {cfg.expand.deepspeed_config!r} -> {ds.name}"

    return _run("device", probe)


def check_launcher() -> Check:
    """The multi-process launchers (`torchrun`, `deepspeed`) on PATH or next to this Python."""

    def probe() -> str:
        here = Path(sys.executable).parent
        found = {}
        for tool in ("torchrun", "deepspeed"):
            path = shutil.which(tool) or (str(here / tool) if (here / tool).is_file() else None)
            if path:
                found[tool] = path
        if "torchrun" not in found and "deepspeed" not in found:
            raise CheckFailed("neither torchrun nor deepspeed found on PATH nor next to " + sys.executable)
        return ", ".join(f"{k} {v}" for k, v in found.items()) + "  (python -m cmoe.stages.expand_main under either)"

    return _run("deepspeed launcher", probe)


# ---------------------------------------------------------------------------- Prefect
def check_prefect(timeout: float) -> Check:
    """Prefect API: /health (reachability), then an authenticated read (version, work pools)."""

    def probe() -> tuple[Status, str] | str:
        import httpx
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        if not api.url:
            return "SKIP", "PREFECT_API_URL not set: flows run on a local ephemeral API (embedded default)"
        url = str(api.url).rstrip("/")
        headers, auth = {}, "no auth"
        if api.auth_string:  # self-hosted server with PREFECT_SERVER_API_AUTH_STRING
            token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
            headers["Authorization"], auth = f"Basic {token}", "PREFECT_API_AUTH_STRING"
        elif api.key:  # Prefect Cloud
            headers["Authorization"], auth = f"Bearer {api.key.get_secret_value()}", "PREFECT_API_KEY"
        with httpx.Client(timeout=timeout, headers=headers, verify=api.tls_insecure_skip_verify is not True) as http:
            try:
                http.get(f"{url}/health").raise_for_status()
            except httpx.HTTPError as err:
                raise CheckFailed(f"{url}: not reachable: {_short(err)}") from None
            version = http.get(f"{url}/admin/version")
            if version.status_code in (401, 403):
                raise CheckFailed(f"{url}: reachable, but {version.status_code} {version.reason_phrase} with {auth}"
                                  " (set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING,"
                                  " or PREFECT_API_KEY for Prefect Cloud)")
            server = version.json() if version.is_success else "?"
            pools = http.post(f"{url}/work_pools/filter", json={"limit": 50})
            pools.raise_for_status()
            names = ", ".join(f"{p['name']} ({p['type']})" for p in pools.json()) or "none yet"
        return f"{url} server {server}, auth: {auth}; work pools: {names}"

    return _run("prefect api", probe)


# ---------------------------------------------------------------------------- MLflow
def check_mlflow(cfg: CmoeConfig, timeout: float) -> list[Check]:
    """MLflow tracking (server version + a one-experiment search), registry (the model and its aliases),
    artifact store (a listing): the registry's own read-only checks, as it is the only code that talks to MLflow."""
    from cmoe.registry import RegistryError, health

    def artifacts() -> str:
        root, detail = health.check_artifacts(cfg, timeout)
        if root.startswith("s3://"):
            detail += f"; S3 endpoint {os.environ.get('MLFLOW_S3_ENDPOINT_URL') or 'AWS default'}, credentials: {_aws_source()}"
        return detail

    checks = [_run("mlflow tracking", lambda: health.check_tracking(cfg, timeout), told=(RegistryError,))]
    if checks[0].status == "FAIL":
        return [*checks, Check("mlflow registry", "FAIL", "tracking server not usable (above)"),
                Check("artifact store", "FAIL", "tracking server not usable (above)")]
    return [*checks, _run("mlflow registry", lambda: health.check_model(cfg, timeout), told=(RegistryError,)),
            _run("artifact store", artifacts, told=(RegistryError,))]


# ---------------------------------------------------------------------------- S3 inbox
def _aws_source() -> str:
    """Where boto3's standard chain found credentials (env, shared-credentials-file, iam-role, ...)."""
    import boto3

    creds = boto3.Session().get_credentials()
    if creds is None:
        raise CheckFailed("no AWS credentials found by the standard chain (AWS_ACCESS_KEY_ID/"
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE / ~/.aws/credentials, SSO, instance or pod role)")
    return creds.method


def check_inbox(cfg: CmoeConfig, timeout: float) -> Check:
    """The inbox the watcher lists: an S3 prefix (reachability, credentials, bundles there) or a folder."""

    def probe() -> str:
        from cmoe.data.storage import S3Limits, S3Prefix, is_s3, s3_client, s3_endpoint

        inbox = cfg.inbox or str(cfg.home / "inbox")
        if not is_s3(inbox):
            p = Path(inbox)
            if not p.exists():
                return f"{p} (local folder; does not exist yet)"
            n = sum(1 for c in p.iterdir() if c.is_dir() and (c / "task.yaml").is_file())
            return f"{p} (local folder; {n} complete bundle(s))"
        from botocore.exceptions import BotoCoreError, ClientError

        source = _aws_source()
        endpoint = s3_endpoint()
        loc = S3Prefix.parse(inbox)
        client = s3_client(S3Limits(connect_timeout_s=timeout, read_timeout_s=timeout, max_attempts=1))
        try:
            listing = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.prefix, Delimiter="/", MaxKeys=1000)
        except (BotoCoreError, ClientError) as err:
            raise CheckFailed(f"{loc.uri}: {_short(err)} (endpoint {endpoint or 'AWS default'}, "
                              f"credentials: {source})") from None
        folders = len(listing.get("CommonPrefixes", []))
        return f"{loc.uri} ({folders} bundle folder(s)); endpoint {endpoint or 'AWS default'}, credentials: {source}"

    return _run("inbox", probe)


# ---------------------------------------------------------------------------- all together
def run_checks(cfg: CmoeConfig, timeout: float = 5.0) -> list[Check]:
    """Every check, in report order."""
    return [
        check_versions(),
        check_device(cfg),
        check_launcher(),
        check_prefect(timeout),
        *check_mlflow(cfg, timeout),
        check_inbox(cfg, timeout),
    ]


def failed(checks: list[Check]) -> bool:
    """True when any check failed (SKIP is not a failure: that service is not configured)."""
    return any(c.status == "FAIL" for c in checks)


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    """JSON-serialisable form of the report."""
    return [asdict(c) for c in checks]
