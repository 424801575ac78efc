"""Rehearsal-free in operation: the lineage keeps evaluation sets, never training data.

Two lineages learn the same two tasks through the real `continual_task` flow. One keeps every
bundle; the other deletes each bundle folder *and* every cache (`<home>/cache`) once its task is
decided, with its registry artifacts and evaluation sets on S3 (a local moto server). The second
must still learn task 2, report task 1 exactly as the first does, and nothing it keeps —
home, artifacts, S3 bucket — may hold a byte of a decided task's training images.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cmoe.config import load_config
from cmoe.data.guard import RehearsalError
from cmoe.registry import Registry

from .conftest import tiny_config_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


@dataclass
class Lineages:
    kept: Registry  # bundles kept where the user put them
    deleted: Registry  # bundles and caches deleted after each decision; artifacts + eval sets on S3
    deleted_config: str
    deleted_home: Path
    bundles: list[Path]  # the two originals (copies were learned)


@pytest.fixture(scope="module")
def lineages(tiny_suite: list[Path], base_dir: Path, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[Lineages]:
    from cmoe.data.storage import s3_client
    from flows.continual import continual_task

    # Two tasks are enough: the second is learned, and task 1 re-tested, after task 1's bundle and caches are gone.
    bundles = tiny_suite
    kept_dir, deleted_dir = tmp_path_factory.mktemp("kept"), tmp_path_factory.mktemp("deleted")
    kept = tiny_config_file(kept_dir, base_dir, "kept")
    deleted = tiny_config_file(deleted_dir, base_dir, "deleted")
    s3_client().create_bucket(Bucket="lineage")
    cfg = yaml.safe_load(Path(deleted).read_text())
    cfg["registry"]["artifact_location"] = "s3://lineage/mlartifacts"
    cfg["data"]["eval_store"] = "s3://lineage/evalsets/"
    Path(deleted).write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
        for bundle in bundles:
            continual_task(str(bundle), kept)
            inbox_copy = deleted_dir / "inbox" / bundle.name
            shutil.copytree(bundle, inbox_copy)
            outcome = continual_task(str(inbox_copy), deleted)
            assert outcome.decision == "approved"
            shutil.rmtree(inbox_copy)  # the user deletes a decided task's bundle ...
            shutil.rmtree(deleted_dir / "home" / "cache", ignore_errors=True)  # ... and every cache of it
        yield Lineages(Registry(load_config(kept)), Registry(load_config(deleted)), deleted, deleted_dir / "home",
                       bundles)


def test_later_tasks_run_and_report_task_1_as_a_lineage_that_kept_its_bundles(lineages: Lineages) -> None:
    kept, deleted = lineages.kept.versions(), lineages.deleted.versions()
    assert [v.decision for v in deleted] == ["approved"] * 2
    first = kept[0].task
    assert [v.acc[first] for v in deleted] == [v.acc[first] for v in kept]
    assert [v.acc for v in deleted] == [v.acc for v in kept]


def test_nothing_kept_holds_bytes_of_a_decided_tasks_training_images(lineages: Lineages, s3_endpoint: str) -> None:
    from cmoe.data.storage import s3_client

    needles = [p.read_bytes() for b in lineages.bundles for p in sorted((b / "train").rglob("*.png"))]
    assert len(needles) >= 2 * 64
    client = s3_client()
    objects = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="lineage")
               for o in page.get("Contents", [])]
    assert any(k.startswith("evalsets/") for k in objects) and any(k.startswith("mlartifacts/") for k in objects)
    kept_files = {f"s3://lineage/{k}": client.get_object(Bucket="lineage", Key=k)["Body"].read() for k in objects}
    kept_files |= {str(f): f.read_bytes() for f in lineages.deleted_home.rglob("*") if f.is_file()}
    hits = sorted(name for name, data in kept_files.items() if any(n in data for n in needles))
    assert hits == []


def test_each_version_records_its_kept_evaluation_set_and_what_was_removed(lineages: Lineages) -> None:
    import json

    for v in lineages.deleted.versions():
        eval_set = json.loads(v.tags["eval_set"])
        assert eval_set["uri"].startswith("s3://lineage/evalsets/") and eval_set["task"] == v.task
        assert eval_set["rows"] == eval_set["of_rows"] == 16
        assert any("/cache/datasets/" in path for path in json.loads(v.tags["retention.removed"]))


def test_a_renamed_copy_of_a_learned_bundle_is_refused_before_anything_is_recorded(
        lineages: Lineages, tmp_path: Path) -> None:
    from flows.continual import continual_task

    copy = tmp_path / "renamed"
    shutil.copytree(lineages.bundles[0], copy)
    first = lineages.deleted.versions()[0].task
    (copy / "task.yaml").write_text((copy / "task.yaml").read_text().replace(f"name: {first}", "name: fresh-task"))
    runs_before = len(lineages.deleted.client.search_runs([lineages.deleted.experiment_id]))
    with pytest.raises(RehearsalError, match=f"already learned as task '{first}'"):
        continual_task(str(copy), lineages.deleted_config)
    assert len(lineages.deleted.client.search_runs([lineages.deleted.experiment_id])) == runs_before
    assert len(lineages.deleted.versions()) == 2
