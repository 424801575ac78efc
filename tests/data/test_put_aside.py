"""After a decision the watcher keeps, moves aside or deletes the user's inbox copy, as configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.data.bundle import bundle_sha256
from cmoe.data.storage import PROCESSED_DIR, fetch_bundle, list_bundles, put_aside, upload_bundle


def test_keep_leaves_the_bundle_where_the_user_put_it(bundle: Path) -> None:
    assert put_aside(str(bundle), str(bundle.parent), "keep") is None and (bundle / "task.yaml").is_file()


def test_move_puts_it_under_processed_where_the_watcher_no_longer_sees_it(bundle: Path) -> None:
    inbox, sha = bundle.parent, bundle_sha256(bundle)
    moved = Path(put_aside(str(bundle), str(inbox), "move"))
    assert not bundle.exists() and moved.parent == inbox / PROCESSED_DIR and bundle_sha256(moved) == sha
    assert list_bundles(inbox) == []


def test_delete_removes_it(bundle: Path) -> None:
    assert put_aside(str(bundle), str(bundle.parent), "delete") is None and not bundle.exists()


@pytest.mark.services
@pytest.mark.parametrize("action", ["move", "delete"])
def test_s3_bundles_are_moved_or_deleted_task_yaml_first(action: str, bundle: Path, s3_bucket: str,
                                                         tmp_path: Path) -> None:
    uri = upload_bundle(bundle, f"s3://{s3_bucket}/inbox/tiny/")
    moved = put_aside(uri, f"s3://{s3_bucket}/inbox/", action)
    assert list_bundles(f"s3://{s3_bucket}/inbox/") == []
    if action == "move":
        assert moved.startswith(f"s3://{s3_bucket}/inbox/{PROCESSED_DIR}/tiny-")
        assert bundle_sha256(fetch_bundle(moved, cache_dir=tmp_path)) == bundle_sha256(bundle)
    else:
        assert moved is None
