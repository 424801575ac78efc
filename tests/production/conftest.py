"""Real services for the production tests, started once per session and stopped by PID.

- PostgreSQL 15: a throwaway cluster (initdb + pg_ctl) in a temporary folder, on a free port of
  127.0.0.1, databases `mlflow` and `prefect`. PostgreSQL refuses to run as root: as root (CI), the
  cluster belongs to the `postgres` user the Debian package creates, and runs through `runuser`.
- S3: a moto server process (`moto_server`) with bucket `cmoe` (versioning on).
- MLflow server: PostgreSQL backend store, artifacts proxied to s3://cmoe/mlartifacts (moto).
- Prefect server: PostgreSQL database, basic auth (`PREFECT_SERVER_API_AUTH_STRING`).

MLflow and Prefect start in parallel (each runs its migrations: ~45 s together on 2 cores).
Every client in these tests is a subprocess with `Services.env`: the pytest process itself never
points Prefect or boto3 at these servers, so other test folders are not affected.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmoe.net import free_port

BIN = Path(sys.executable).parent  # console scripts of this environment (mlflow, prefect, moto_server)
PG_USER = "cmoe"
PREFECT_AUTH = "cmoe:services-test"  # basic auth of the test Prefect server ("user:password")
BUCKET = "cmoe"
STARTUP_S = 240  # both servers migrate a fresh PostgreSQL database; 2 busy cores are slow
_DROP_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILE", "AWS_PROFILE",
             "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "CMOE_CONFIG",
             # set by an in-process training of this pytest process (rank 0 of 1): never inherit them
             "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def wait_until(probe: Callable[[], bool], timeout: float, what: str, proc: Started | None = None) -> None:
    """Poll `probe` every 0.5 s; fail with the service's log tail if it does not come up (or dies)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if probe():
                return
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up within {timeout:.0f} s" + (f":\n{proc.log_tail()}" if proc else ""))
        time.sleep(0.5)


def http_ok(url: str) -> bool:
    """True when GET url answers 2xx within 2 s."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - local test URL
        return 200 <= r.status < 300


@dataclass
class Started:
    """A server process this session started: its own process group, its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def stop(self) -> None:
        """SIGTERM to the process group this session created (the server and its workers), then SIGKILL."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # workers left behind by the group leader
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def start(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> Started:
    """Start `cmd` in a new session (its pid = its process group id), output to logs/<name>.log."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    return Started(name, popen, log)


# ---------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path:
    """Folder of PostgreSQL's server binaries (15 preferred)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: (not p.startswith("/usr/lib/postgresql/15/"), p))
    if found:
        return Path(found[0]).parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    pytest.fail("PostgreSQL is not installed (initdb not found): apt-get install postgresql-15 "
                "(.ci/run installs it when missing)")


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster; `url(db, driver)` gives SQLAlchemy URLs for it."""

    port: int
    data: Path
    pid: int
    run_as: str | None  # OS user the server runs as (None: this user)
    bin: Path

    def url(self, db: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str):  # noqa: ANN201 - a psycopg2 connection
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname=db)


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """initdb + pg_ctl start on a free port; yields the cluster; stops it (pg_ctl, then its PID)."""
    pg_bin = _pg_bin()
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no `postgres` user to run PostgreSQL as "
                        "(the postgresql package creates it)")
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="cmoe-pg-", dir="/tmp"))  # not under pytest's 0700 tmp: `postgres` must reach it
    if run_as:
        shutil.chown(root, user=run_as)
    data, port = root / "data", free_port()
    subprocess.run(_as_user(run_as, [str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
                                     "-E", "UTF8", "--no-sync", "--no-instructions"]),
                   check=True, capture_output=True)
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    subprocess.run(_as_user(run_as, [str(pg_bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "server.log"),
                                     "-w", "-t", "60", "start"]), check=True, capture_output=True)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    cluster = Postgres(port, data, pid, run_as, pg_bin)
    try:
        conn = cluster.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("mlflow", "prefect"):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()
        yield cluster
    finally:
        subprocess.run(_as_user(run_as, [str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       check=False, capture_output=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # only if pg_ctl could not stop it
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- all services
@dataclass
class Services:
    """Where the session's services listen, and the environment a client process needs for them."""

    pg: Postgres
    s3_endpoint: str
    mlflow_uri: str
    prefect_api: str
    logs: Path
    env: dict[str, str] = field(default_factory=dict)

    def s3(self):  # noqa: ANN201 - a boto3 S3 client on the moto server
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(home), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """PostgreSQL + moto S3 + MLflow server + Prefect server, for the whole session."""
    root = tmp_path_factory.mktemp("services")
    logs = root / "logs"
    logs.mkdir()
    started: list[Started] = []
    with postgres_cluster() as pg:
        try:
            s3_port, mlflow_port, prefect_port = free_port(), free_port(), free_port()
            s3_endpoint = f"http://127.0.0.1:{s3_port}"
            env = _base_env(root / "prefect-server-home")
            moto = start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env, logs)
            started.append(moto)
            wait_until(lambda: http_ok(f"{s3_endpoint}/moto-api/"), 60, "moto server", moto)

            mlflow_env = {**env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
            started.append(start("mlflow", [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                "--backend-store-uri", pg.url("mlflow"), "--serve-artifacts",
                "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"], mlflow_env, logs))
            prefect_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "asyncpg"),
                           "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH}
            started.append(start("prefect", [
                str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
                "--no-ui"], prefect_env, logs))

            services = Services(pg, s3_endpoint, f"http://127.0.0.1:{mlflow_port}",
                                f"http://127.0.0.1:{prefect_port}/api", logs)
            s3 = services.s3()
            s3.create_bucket(Bucket=BUCKET)
            s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
            wait_until(lambda: http_ok(f"{services.mlflow_uri}/health"), STARTUP_S, "MLflow server", started[1])
            wait_until(lambda: http_ok(f"{services.prefect_api}/health"), STARTUP_S, "Prefect server", started[2])

            services.env = {**_base_env(root / "client-prefect-home"), "CMOE_S3_ENDPOINT_URL": s3_endpoint,
                            "PREFECT_API_URL": services.prefect_api, "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
                            # the local API is never used, but its start-up wait must not be the 20 s default
                            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
            yield services
        finally:
            for proc in reversed(started):
                proc.stop()


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmoe ARGS` (this environment's console script) as a client process; output captured."""
    return subprocess.run([str(BIN / "cmoe"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


# ---------------------------------------------------------------------------- tiny lineage inputs
# tiny_suite and tiny_base: session fixtures of tests/conftest.py
