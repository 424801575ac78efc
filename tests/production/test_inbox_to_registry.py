"""One task bundle dropped into an S3 inbox travels watcher → continual-task → MLflow registry, on
the real services: Prefect server and MLflow server on PostgreSQL, artifacts in S3 (moto), and
the expansion as 2 DeepSpeed ranks under torchrun (`expand.nproc_per_node: 2`).

Everything runs as a user would run it: `cmoe watch --once` and `cmoe predict` are separate
processes with only the services' URLs and credentials in their environment. The watcher runs
once per module (fixture `watched`); each test checks one place the result must have reached.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cmoe.config import tiny_test_config

from .conftest import BUCKET, Services, run_cli

pytestmark = pytest.mark.services
ARTIFACTS = "mlartifacts/cmoe-e2e/"  # the server's --artifacts-destination + the experiment's location


@dataclass
class Watched:
    config: Path
    bundle: Path
    cwd: Path
    run: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def watched(services: Services, tiny_suite: list[Path], tiny_base: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Watched:
    """Drop the first tiny bundle into s3://cmoe/inbox/, then `cmoe watch --once` on the services."""
    from cmoe.data.storage import upload_bundle

    root = tmp_path_factory.mktemp("e2e")
    bundle = tiny_suite[0]
    cfg = tiny_test_config(root / "home").model_dump(mode="json")
    cfg["base"]["path"] = str(tiny_base)
    cfg["inbox"] = f"s3://{BUCKET}/inbox/"
    cfg["registry"].update(tracking_uri=services.mlflow_uri, artifact_location="mlflow-artifacts:/cmoe-e2e")
    cfg["expand"]["nproc_per_node"] = 2  # the flow's expansion runs as 2 torchrun ranks (gloo, CPU)
    config = root / "cmoe.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:  # a writer drops the bundle in, task.yaml last
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "CMOE_S3_ENDPOINT_URL"):
            mp.setenv(key, services.env[key])
        upload_bundle(bundle, f"s3://{BUCKET}/inbox/{bundle.name}/")
    run = run_cli(["watch", "--once", "--config", str(config)], services.env, root, timeout=600)
    return Watched(config, bundle, root, run)


@pytest.mark.timeout(900)
def test_the_watcher_runs_continual_task_and_the_gate_approves(watched: Watched) -> None:
    assert watched.run.returncode == 0, watched.run.stdout[-3000:] + watched.run.stderr[-6000:]
    assert re.search(r"shape-name: approved \(v1\)", watched.run.stdout), watched.run.stdout
    expanded = json.loads(next((watched.config.parent / "home" / "runs").glob("*/expand/done.json")).read_text())
    assert expanded["train"]["world_size"] == 2


def test_the_registry_rows_are_in_postgresql(services: Services, watched: Watched) -> None:
    with services.pg.connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM registered_models")
        assert [r[0] for r in cur.fetchall()] == ["cmoe"]
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = 'cmoe'")
        versions = cur.fetchall()
        assert [v[0] for v in versions] == [1] and versions[0][1]
        cur.execute("SELECT key, value FROM model_version_tags WHERE name = 'cmoe' AND version = 1")
        tags = dict(cur.fetchall())
        assert tags["decision"] == "approved" and tags["task"] == "shape-name" and len(tags["bundle_sha256"]) == 64
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'cmoe'")
        assert dict(cur.fetchall()) == {"champion": 1}
    with services.pg.connect("prefect") as conn, conn.cursor() as cur:  # and the flow runs in Prefect's
        cur.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        runs = cur.fetchall()
        assert ("watch-inbox", "COMPLETED") in runs and ("continual-task", "COMPLETED") in runs, runs


def test_the_model_artifacts_are_in_s3(services: Services, watched: Watched) -> None:
    keys = [o["Key"] for page in services.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=ARTIFACTS)
            for o in page.get("Contents", [])]
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"MLmodel", "cmoe.json", "experts.safetensors", "router.safetensors", "locator.safetensors"} <= names, names
    assert not any(k.endswith((".pt", ".pkl", ".pickle")) for k in keys), "no pickle is ever published"


@pytest.mark.timeout(600)
def test_cmoe_predict_answers_with_the_champion(services: Services, watched: Watched) -> None:
    image = sorted((watched.bundle / "test" / "images").iterdir())[0]
    done = run_cli(["predict", "--image", str(image), "--question", "Which shape is this?",
                    "--config", str(watched.config)], services.env, watched.cwd, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "(task shape-name, confidence" in done.stdout, done.stdout
