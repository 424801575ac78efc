"""Orchestration fixtures: one Prefect API per session, a tiny two-task suite with its base, local S3, and
the watcher's two-task lineage (`watched`)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

# Prefect reads its settings when first imported: this session gets its own home, removed at exit.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cmoe-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cmoe.config import CmoeConfig  # noqa: E402

T = TypeVar("T")
STARTUP_S = 180  # the API's first start takes ~30 s on 2 busy cores; Prefect's default gives up at 20


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (SQLite) for the whole session: pauses, resumes and flow-run queries need one."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=STARTUP_S):
        yield


@pytest.fixture(scope="session")
def suite(tiny_suite: list[Path]) -> list[Path]:
    """The first two bundles of the session's tiny coin-mini (tests/conftest.py)."""
    return tiny_suite


@pytest.fixture(scope="session")
def base_dir(tiny_base: Path) -> Path:
    """The session's tiny pretrained base, shared by every test home (tests/conftest.py)."""
    return tiny_base


def tiny_config_file(folder: Path, base: Path, name: str, inbox: str | None = None, growth: str = "delta",
                     **gate: Any) -> str:
    """Write a tiny YAML config (home folder/home, the shared base, expand.growth, gate overrides); its path."""
    from cmoe.config import tiny_test_config

    cfg: CmoeConfig = tiny_test_config(folder / "home")  # its gate approves whatever the stages produce
    cfg.base.path = str(base)
    cfg.inbox = inbox
    cfg.expand.growth = growth
    cfg.flow.review_poll_s = 1  # a paused run notices the answer within a second
    for field, value in gate.items():
        setattr(cfg.gate, field, value)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


@pytest.fixture
def write_config(base_dir: Path, tmp_path: Path) -> Callable[..., str]:
    """write_config(name, inbox=None, **gate) -> a tiny config whose home is this test's tmp_path/home."""
    return lambda name, inbox=None, **gate: tiny_config_file(tmp_path, base_dir, name, inbox, **gate)


@pytest.fixture
def cli() -> Callable[..., str]:
    """cli(*args) -> output of `cmoe args...`; fails the test on a non-zero exit."""
    from cmoe.cli import app

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, list(args))
        command = "cmoe " + " ".join(args)
        assert result.exit_code == 0, f"{command}: exit {result.exit_code}\n{result.output}{result.exception!r}"
        return result.output

    return invoke


def wait_for(probe: Callable[[], T], timeout: float = 300.0, what: str = "condition") -> T:
    """Poll `probe()` once a second until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(1)
    return value


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 endpoint (moto server on a free port) with dummy credentials, as tests/data uses."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                           ("AWS_DEFAULT_REGION", "us-east-1"), ("CMOE_S3_ENDPOINT_URL", f"http://{host}:{port}")):
            mp.setenv(key, value)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def watched(prefect_api: None, suite: list[Path], s3_endpoint: str, base_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Any], list[Any]]:
    """An S3 inbox with the two bundles, watched twice: (config, first run's outcomes, second's).

    Once per session: the flow tests inspect what it registered, the serving tests serve its champion.
    """
    from cmoe.data.storage import s3_client, upload_bundle
    from flows.watch import watch_inbox

    s3_client().create_bucket(Bucket="inbox")
    for bundle in suite:  # uploaded in order: task.yaml last, so arrival order = suite order
        upload_bundle(bundle, f"s3://inbox/new/{bundle.name}/")
    config = tiny_config_file(tmp_path_factory.mktemp("watch"), base_dir, "auto", inbox="s3://inbox/new/")
    return config, watch_inbox(config), watch_inbox(config)
