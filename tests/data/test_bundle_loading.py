"""Loading: both layouts give the same canonical rows; bad bundles raise with every problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmoe.data.bundle import BundleError, TaskSpec
from cmoe.data.guard import training_scope
from cmoe.data.loading import FEATURES, load_split, read_task_spec
from cmoe.data.validate import open_bundle

from .helpers import snapshot


def rows(ds) -> list[tuple]:
    """Rows as comparable tuples (pixels instead of PIL objects)."""
    return [(np.asarray(r["image"]).tobytes(), r["question"], r["answer"], r["answers"], r["id"]) for r in ds]


def train_rows(root: Path, cache: Path):
    """The train split of the bundle at `root`, read as its own task's stages read it."""
    bundle = open_bundle(root)
    with training_scope(bundle, {}):
        return load_split(bundle, "train", cache_dir=cache)


def test_imagefolder_and_parquet_load_identical_rows(make_bundle, tmp_path: Path) -> None:
    folder = make_bundle("if", layout="imagefolder")
    before = snapshot(folder)
    loaded = {
        layout: train_rows(make_bundle(layout, layout=layout) if layout != "imagefolder" else folder, tmp_path / "cache")
        for layout in ("imagefolder", "parquet", "parquet-bytes")
    }
    assert snapshot(folder) == before  # the datasets cache went to cache_dir, not into the bundle
    assert all(ds.features == FEATURES for ds in loaded.values())
    expected = rows(loaded["imagefolder"])
    assert rows(loaded["parquet"]) == expected and rows(loaded["parquet-bytes"]) == expected


def test_optional_fields_get_defaults(bundle: Path, tmp_path: Path) -> None:
    ds = load_split(open_bundle(bundle), "test", cache_dir=tmp_path / "cache")
    first = ds[0]["answer"]
    assert ds[0]["answers"] == [first, f"{first}ish"] and ds[0]["id"] == "test-q0"
    assert ds[2]["answers"] == [ds[2]["answer"]] and ds[2]["id"] == "test-2"  # no answers, no id
    assert ds[0]["image"].size == (8, 8)


def test_invalid_bundle_raises_with_every_problem(bundle: Path, tmp_path: Path) -> None:
    (bundle / "test/images/0.png").write_bytes(b"junk")
    (bundle / "train/images/1.png").unlink()
    with pytest.raises(BundleError) as err:
        open_bundle(bundle)
    assert [str(p).split(":")[0] for p in err.value.problems] == ["train/metadata.jsonl", "test/images/0.png"]


def test_read_task_spec(bundle: Path) -> None:
    assert read_task_spec(bundle) == TaskSpec("tiny-color", "Name the colour.", 1, "exact_match", None)
    (bundle / "task.yaml").unlink()
    with pytest.raises(BundleError, match="task.yaml: missing"):
        read_task_spec(bundle)
