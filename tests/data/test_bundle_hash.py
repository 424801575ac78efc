"""The bundle hash: the documented formula, independent of location, sensitive to any change."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from cmoe.data.bundle import BundleError, bundle_sha256


def test_hash_follows_the_documented_formula(bundle: Path) -> None:
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    lines = "".join(f"{rel}\t{hashlib.sha256((bundle / rel).read_bytes()).hexdigest()}\n" for rel in files)
    assert bundle_sha256(bundle) == hashlib.sha256(lines.encode()).hexdigest()


def test_hash_is_stable_across_copies_and_changes_with_content(bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(bundle, tmp_path / "elsewhere" / "copy")
    assert bundle_sha256(copy) == bundle_sha256(bundle)
    (copy / "test/images/0.png").rename(copy / "test/images/0b.png")  # same bytes, other path
    assert bundle_sha256(copy) != bundle_sha256(bundle)


def test_hash_refuses_symlinks_instead_of_following_them(bundle: Path) -> None:
    os.symlink("/etc/hostname", bundle / "train/link.png")
    with pytest.raises(BundleError, match="train/link.png"):
        bundle_sha256(bundle)
