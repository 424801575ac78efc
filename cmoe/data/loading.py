"""Load a split of a validated bundle as a `datasets.Dataset` with one canonical schema for both layouts.

Loading takes a `ValidatedBundle` (see validate.open_bundle): the bundle was validated and hashed
once, so nothing here re-reads or re-hashes the other split. Every load goes through the rehearsal
guard. `datasets` writes its Arrow cache under `<cache_dir>/datasets/<bundle sha256>/`, never into
the bundle, so `forget_local_copies` can remove one bundle's local copies once its task is decided.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets

from cmoe.data.bundle import (
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    SPLITS,
    TASK_FILE,
    BundleError,
    Problem,
    TaskSpec,
    parquet_file,
    scan_tree,
)
from cmoe.data.guard import check_split_access
from cmoe.data.storage import forget_download, read_bundle_file
from cmoe.data.validate import ValidatedBundle, parse_task_yaml

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "id": datasets.Value("string"),
    }
)


def read_task_spec(uri: str | Path) -> TaskSpec:
    """The bundle's task.yaml as a TaskSpec, reading only that file (cheap, even on S3)."""
    data = read_bundle_file(uri, TASK_FILE)
    if data is None:
        raise BundleError(str(uri), [Problem(TASK_FILE, "missing: the bundle is incomplete (task.yaml is written last)")])
    try:
        spec, problems = parse_task_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        spec, problems = None, [Problem(TASK_FILE, f"cannot read ({err})")]
    if spec is None:
        raise BundleError(str(uri), problems)
    return spec


def load_split(bundle: ValidatedBundle, split: str, *, cache_dir: Path) -> datasets.Dataset:
    """One split as a Dataset with columns image (PIL), question, answer, answers, id."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of: {', '.join(SPLITS)})")
    check_split_access(bundle, split)
    root = Path(bundle.root)
    hf_cache = str(_datasets_cache(bundle.sha256, cache_dir))
    if bundle.layouts[split] == "imagefolder":
        # Explicit files, not data_dir: a sub-folder named like a split ("test/") would make
        # `datasets` infer splits from folder names. Images not named in metadata.jsonl are ignored.
        files, _ = scan_tree(root / split)
        images = [str(root / split / f) for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        data_files = [str(root / split / METADATA_FILE), *images]
        ds = datasets.load_dataset("imagefolder", data_files={"train": data_files}, split="train", cache_dir=hf_cache)
    else:
        ds = datasets.load_dataset(
            "parquet", data_files={"train": [str(root / parquet_file(split))]}, split="train", cache_dir=hf_cache
        )
    return _canonical(ds, split)


def _datasets_cache(bundle_sha256: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "datasets" / bundle_sha256


def forget_local_copies(bundle: ValidatedBundle, *, cache_dir: Path) -> list[str]:
    """Delete every local copy cmoe made of a bundle (the S3 download, the `datasets` Arrow cache),
    never the user's own folder; the paths removed. Called once the bundle's task is decided."""
    removed = []
    if forget_download(bundle.root, cache_dir=cache_dir):
        removed.append(bundle.root)
    arrow = _datasets_cache(bundle.sha256, cache_dir)
    if arrow.is_dir():
        shutil.rmtree(arrow)
        removed.append(str(arrow))
    return removed


def _canonical(ds: datasets.Dataset, split: str) -> datasets.Dataset:
    """Fill the optional columns (answers = [answer], id = f"{split}-{row}") and cast to FEATURES."""
    # Images stay undecoded during the map: only the text columns are touched.
    ds = ds.cast_column("image", datasets.Image(decode=False))

    def fill(batch: dict, rows: list[int]) -> dict:
        answers = batch.get("answers") or [None] * len(rows)
        ids = batch.get("id") or [None] * len(rows)
        return {
            "answers": [a if a else [answer] for a, answer in zip(answers, batch["answer"], strict=True)],
            "id": [i if i is not None else f"{split}-{row}" for i, row in zip(ids, rows, strict=True)],
        }

    ds = ds.map(fill, with_indices=True, batched=True, desc=None)
    return ds.select_columns(list(FEATURES)).cast(FEATURES)
