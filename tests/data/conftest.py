"""Fixtures for the data layer: tiny bundles built with PIL, and a real local S3 (moto server)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import TASK_YAML, example_rows, write_imagefolder_split, write_parquet_split

MakeBundle = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path) -> MakeBundle:
    """Factory: make_bundle(name, layout="imagefolder"|"parquet"|"parquet-bytes") -> a valid bundle."""

    def make(name: str = "bundle", layout: str = "imagefolder", n_train: int = 4, n_test: int = 3) -> Path:
        root = tmp_path / name
        for split, n in (("train", n_train), ("test", n_test)):
            rows = example_rows(split, n)
            if layout == "imagefolder":
                write_imagefolder_split(root / split, rows)
            else:
                write_parquet_split(root / split, split, rows, raw_bytes=layout == "parquet-bytes")
        (root / "task.yaml").write_text(TASK_YAML)  # last, as every writer must
        return root

    return make


@pytest.fixture
def bundle(make_bundle: MakeBundle) -> Path:
    """A valid ImageFolder bundle: train 4 rows, test 3 rows."""
    return make_bundle()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint (moto server on 127.0.0.1, free port), with dummy credentials in the env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("CMOE_S3_ENDPOINT_URL", endpoint)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket per test (named after the test, so tests never share objects)."""
    from cmoe.data.storage import s3_client

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_client().create_bucket(Bucket=name)
    return name
