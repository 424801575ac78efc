"""Delivering a finished bundle into an inbox: the watcher sees it complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.data.bundle import BundleError, bundle_sha256
from cmoe.data.storage import list_bundles
from cmoe.data.writer import deliver_bundle


def test_a_local_delivery_leaves_only_the_complete_bundle_in_the_inbox(bundle: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    uri = deliver_bundle(bundle, str(inbox))
    assert uri == str(inbox / bundle.name)
    assert [r.uri for r in list_bundles(inbox)] == [uri]
    assert [p.name for p in inbox.iterdir()] == [bundle.name]  # no staging folder left behind
    assert bundle_sha256(Path(uri)) == bundle_sha256(bundle)


def test_a_bundle_already_in_a_local_inbox_is_left_as_it_is(bundle: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    first = deliver_bundle(bundle, str(inbox))
    delivered = bundle_sha256(Path(first))
    (bundle / "test" / "images" / "extra.png").write_bytes(b"not part of the delivered bundle")
    assert deliver_bundle(bundle, str(inbox)) == first
    assert bundle_sha256(Path(first)) == delivered


def test_a_bundle_with_a_link_is_refused_and_the_inbox_stays_empty(bundle: Path, tmp_path: Path) -> None:
    (bundle / "train" / "link.png").symlink_to(bundle / "test" / "images" / "1.png")
    inbox = tmp_path / "inbox"
    with pytest.raises(BundleError, match="symlinks are not allowed"):
        deliver_bundle(bundle, str(inbox))
    assert not inbox.exists()  # refused before anything was written


@pytest.mark.services
def test_an_s3_delivery_is_listed_under_the_bundle_name(bundle: Path, s3_bucket: str) -> None:
    uri = deliver_bundle(bundle, f"s3://{s3_bucket}/inbox/")
    assert uri == f"s3://{s3_bucket}/inbox/{bundle.name}/"
    assert [r.uri for r in list_bundles(f"s3://{s3_bucket}/inbox")] == [uri]
