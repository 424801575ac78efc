"""S3 bundles against a real local endpoint (moto server): same hash and rows as the local copy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cmoe.data import storage
from cmoe.data.bundle import BundleError, bundle_sha256
from cmoe.data.loading import load_split, read_task_spec
from cmoe.data.storage import StorageError, fetch_bundle, list_bundles, upload_bundle
from cmoe.data.validate import open_bundle, validate

from .test_bundle_loading import rows

pytestmark = pytest.mark.services


def test_s3_bundle_validates_and_loads_like_its_local_copy(bundle: Path, s3_bucket: str, tmp_path: Path) -> None:
    uri = upload_bundle(bundle, f"s3://{s3_bucket}/inbox/tiny")
    assert uri == f"s3://{s3_bucket}/inbox/tiny/"
    report = validate(uri, cache_dir=tmp_path / "cache")
    assert report.ok and report.sha256 == bundle_sha256(bundle)
    assert report.root.parent == tmp_path / "cache" / "bundles"
    assert read_task_spec(uri).name == "tiny-color"
    remote = load_split(open_bundle(uri, cache_dir=tmp_path / "cache"), "test", cache_dir=tmp_path / "cache")
    assert rows(remote) == rows(load_split(open_bundle(bundle), "test", cache_dir=tmp_path / "cache"))


def test_download_is_keyed_by_listing_and_reused(bundle: Path, s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    uri = upload_bundle(bundle, f"s3://{s3_bucket}/b1")
    first = fetch_bundle(uri, cache_dir=tmp_path)
    assert bundle_sha256(first) == bundle_sha256(bundle)
    downloads = []
    real_client = storage.s3_client

    def counting_client():
        client = real_client()
        original = client.download_file
        client.download_file = lambda *a, **k: (downloads.append(a), original(*a, **k))[1]
        return client

    monkeypatch.setattr(storage, "s3_client", counting_client)
    assert fetch_bundle(uri, cache_dir=tmp_path) == first and downloads == []
    # Same content under another prefix: same listing (relative keys, sizes, ETags), same folder.
    assert fetch_bundle(upload_bundle(bundle, f"s3://{s3_bucket}/b2"), cache_dir=tmp_path) == first
    assert downloads == []
    # Once the local copy is forgotten (its task decided), the next fetch downloads it again.
    assert storage.forget_download(first, cache_dir=tmp_path) and not first.exists()
    assert fetch_bundle(uri, cache_dir=tmp_path) == first and downloads
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == [first.name]


def test_incomplete_s3_bundle_is_neither_listed_nor_downloaded(bundle: Path, s3_bucket: str, tmp_path: Path) -> None:
    upload_bundle(bundle, f"s3://{s3_bucket}/inbox/complete")
    (bundle / "task.yaml").unlink()
    upload_bundle(bundle, f"s3://{s3_bucket}/inbox/partial")
    assert [r.name for r in list_bundles(f"s3://{s3_bucket}/inbox")] == ["complete"]
    report = validate(f"s3://{s3_bucket}/inbox/partial/", cache_dir=tmp_path)
    assert [str(p) for p in report.problems] == ["task.yaml: missing: the bundle is incomplete (task.yaml is written last)"]
    assert not (tmp_path / "bundles").exists()


def test_an_s3_bundle_that_fails_validation_leaves_nothing_in_the_cache(bundle: Path, s3_bucket: str,
                                                                        tmp_path: Path) -> None:
    (bundle / "train" / "images" / "1.png").unlink()  # a row whose image is missing: refused
    uri = upload_bundle(bundle, f"s3://{s3_bucket}/inbox/broken")
    cache = tmp_path / "cache"
    report = validate(uri, cache_dir=cache)
    assert [str(p) for p in report.problems] == ["train/metadata.jsonl:2: image 'images/1.png' not found"]
    assert report.root is None and [p for p in cache.rglob("*") if p.name != "bundles"] == []
    with pytest.raises(BundleError):  # the stages' entry (the flow's fetch) downloads and refuses it alike
        open_bundle(uri, cache_dir=cache)
    assert [p for p in cache.rglob("*") if p.name != "bundles"] == []
    assert validate(bundle, cache_dir=cache).problems == report.problems and (bundle / "task.yaml").is_file()


def test_s3_bundles_are_listed_in_arrival_order(make_bundle, s3_bucket: str) -> None:
    upload_bundle(make_bundle("b"), f"s3://{s3_bucket}/inbox/zz-first")
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    upload_bundle(make_bundle("a"), f"s3://{s3_bucket}/inbox/aa-second")
    refs = list_bundles(f"s3://{s3_bucket}/inbox/")
    assert [r.uri for r in refs] == [f"s3://{s3_bucket}/inbox/zz-first/", f"s3://{s3_bucket}/inbox/aa-second/"]


def test_local_bundles_are_listed_complete_only_in_arrival_order(make_bundle, tmp_path: Path) -> None:
    for name, mtime in (("zz-first", 1000), ("aa-second", 2000)):
        os.utime(make_bundle(f"inbox/{name}") / "task.yaml", (mtime, mtime))
    (make_bundle("inbox/partial") / "task.yaml").unlink()
    assert [r.name for r in list_bundles(tmp_path / "inbox")] == ["zz-first", "aa-second"]


def test_unsafe_s3_key_is_refused_not_downloaded(bundle: Path, s3_bucket: str, tmp_path: Path) -> None:
    uri = upload_bundle(bundle, f"s3://{s3_bucket}/evil")
    storage.s3_client().put_object(Bucket=s3_bucket, Key="evil/train/../../escape.png", Body=b"x")
    report = validate(uri, cache_dir=tmp_path)
    assert [str(p) for p in report.problems] == ["train/../../escape.png: S3 key is not a safe relative file path"]
    assert not (tmp_path / "escape.png").exists()


def test_missing_bucket_is_a_storage_error(s3_endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="s3://no-such-bucket/x/"):
        fetch_bundle("s3://no-such-bucket/x", cache_dir=tmp_path)
