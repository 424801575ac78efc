"""Kept evaluation sets: a task's test split, kept once by content, read back unchanged, hash-checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmoe.data.evalsets import EvalSetError, delete_eval_set, eval_set_of, keep_eval_set, open_eval_set
from cmoe.data.loading import load_split
from cmoe.data.validate import open_bundle

from .test_bundle_loading import rows


def test_a_kept_set_reads_back_as_the_test_split(bundle: Path, tmp_path: Path) -> None:
    opened = open_bundle(bundle)
    ref = keep_eval_set(opened, str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    kept = open_eval_set(ref, cache_dir=tmp_path / "cache")
    assert rows(kept.rows) == rows(load_split(opened, "test", cache_dir=tmp_path / "cache"))
    assert kept.spec == opened.spec and kept.sha256 == ref.sha256
    assert (ref.task, ref.rows, ref.of_rows, ref.bundle_sha256) == ("tiny-color", 3, 3, opened.sha256)
    assert Path(ref.uri) == (tmp_path / "store" / f"{ref.sha256}.parquet").resolve()


def test_the_store_is_content_addressed(bundle: Path, tmp_path: Path) -> None:
    opened = open_bundle(bundle)
    first = keep_eval_set(opened, str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    again = keep_eval_set(opened, str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert again == first and [p.name for p in (tmp_path / "store").iterdir()] == [f"{first.sha256}.parquet"]


def test_a_subset_is_seeded_and_drawn_from_the_test_split(make_bundle, tmp_path: Path) -> None:
    opened = open_bundle(make_bundle(n_test=9))
    test_ids = load_split(opened, "test", cache_dir=tmp_path)["id"]
    subsets = [eval_set_of(opened, cache_dir=tmp_path, keep=4, seed=seed).rows["id"] for seed in (0, 0, 1)]
    assert subsets[0] == subsets[1] != subsets[2]
    assert len(subsets[0]) == 4 and set(subsets[0]) <= set(test_ids)
    ref = keep_eval_set(opened, str(tmp_path / "store"), cache_dir=tmp_path, keep=4, seed=0)
    assert (ref.rows, ref.of_rows) == (4, 9)
    assert open_eval_set(ref, cache_dir=tmp_path).rows["id"] == subsets[0]


def test_in_memory_and_kept_sets_hold_the_same_rows(bundle: Path, tmp_path: Path) -> None:
    opened = open_bundle(bundle)
    ref = keep_eval_set(opened, str(tmp_path / "store"), cache_dir=tmp_path)
    assert rows(eval_set_of(opened, cache_dir=tmp_path).rows) == rows(open_eval_set(ref, cache_dir=tmp_path).rows)


def test_a_changed_set_is_refused(bundle: Path, tmp_path: Path) -> None:
    ref = keep_eval_set(open_bundle(bundle), str(tmp_path / "store"), cache_dir=tmp_path)
    data = Path(ref.uri).read_bytes()
    Path(ref.uri).write_bytes(data[: len(data) // 2])
    with pytest.raises(EvalSetError, match="tiny-color.*changed or truncated"):
        open_eval_set(ref, cache_dir=tmp_path)


def test_a_deleted_set_is_reported_missing(bundle: Path, tmp_path: Path) -> None:
    ref = keep_eval_set(open_bundle(bundle), str(tmp_path / "store"), cache_dir=tmp_path)
    delete_eval_set(ref, cache_dir=tmp_path)
    with pytest.raises(EvalSetError, match="missing from the store"):
        open_eval_set(ref, cache_dir=tmp_path)


@pytest.mark.services
def test_an_s3_store_keeps_and_reads_back_the_same_rows(bundle: Path, s3_bucket: str, tmp_path: Path) -> None:
    opened = open_bundle(bundle)
    ref = keep_eval_set(opened, f"s3://{s3_bucket}/cmoe/evalsets/", cache_dir=tmp_path)
    assert ref.uri == f"s3://{s3_bucket}/cmoe/evalsets/{ref.sha256}.parquet"
    kept = open_eval_set(ref, cache_dir=tmp_path / "reader")
    assert rows(kept.rows) == rows(load_split(opened, "test", cache_dir=tmp_path))
    first = np.asarray(kept.rows[0]["image"])
    assert first.shape == (8, 8, 3)
    delete_eval_set(ref, cache_dir=tmp_path / "reader")
    with pytest.raises(EvalSetError, match="missing from the store"):
        open_eval_set(ref, cache_dir=tmp_path / "reader")
