"""Evaluation sets: what the lineage keeps of each task's data — its test split, never its train split.

When a task is learned, its test split (or a seeded subset of `keep` rows) is written once as one
Parquet file into a content-addressed store: a local folder or `s3://bucket/prefix/`, named
`<sha256 of the file>.parquet`. The model state references it by that hash (`EvalSetRef`), and
re-testing old tasks reads only these files, so a task's bundle may be deleted once it is decided.
Every read checks the file's hash: a changed or truncated set is refused, never scored.

File format: columns image (struct bytes/path, as `datasets.Image` stores it; path always null),
question, answer, answers, id — the canonical schema of `loading.FEATURES` — and the schema
metadata key `cmoe.eval_set`, JSON: the task spec, the source bundle's hash, the test split's hash,
and how the rows were chosen.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ClientError

from cmoe.data.bundle import TaskSpec, file_sha256
from cmoe.data.loading import FEATURES, load_split
from cmoe.data.storage import S3Prefix, is_s3, s3_client, s3_errors
from cmoe.data.validate import ValidatedBundle
from cmoe.files import write_bytes_atomic

SUFFIX = ".parquet"
META_KEY = b"cmoe.eval_set"
_SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("question", pa.string()), ("answer", pa.string()), ("answers", pa.list_(pa.string())), ("id", pa.string()),
])


class EvalSetError(ValueError):
    """A kept evaluation set is missing or does not match its recorded hash."""


@dataclass(frozen=True)
class EvalSetRef:
    """Where a task's kept evaluation set is and what it is: the entry the model state records."""

    task: str
    sha256: str  # of the Parquet file: its name in the store
    uri: str  # the file: a local path or s3://bucket/key
    rows: int  # rows kept
    of_rows: int  # rows of the test split they were drawn from
    bytes: int
    bundle_sha256: str  # the bundle it came from
    test_sha256: str  # that bundle's test split

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalSetRef:
        """Parse the manifest's JSON entry."""
        return cls(**data)


@dataclass
class EvalSet:
    """A task's evaluation set in memory: its spec (metric, instruction) and canonical rows."""

    spec: TaskSpec
    rows: datasets.Dataset
    sha256: str | None  # of the kept file; None when built in memory without keeping it


def store_location(eval_store: str | None, home: Path) -> str:
    """The configured store (`data.eval_store`), or `<home>/evalsets`."""
    return eval_store or str((Path(home) / "evalsets").resolve())


def _table(bundle: ValidatedBundle, *, cache_dir: Path, keep: int | None, seed: int) -> pa.Table:
    """The evaluation set of `bundle` as an Arrow table: its test split, or a seeded subset of it."""
    rows = load_split(bundle, "test", cache_dir=cache_dir).cast_column("image", datasets.Image(decode=False))
    n = len(rows)
    chosen = sorted(random.Random(seed).sample(range(n), keep)) if keep is not None and keep < n else list(range(n))
    columns: dict[str, list] = {name: [] for name in _SCHEMA.names}
    for i in chosen:
        row = rows[i]
        image = row["image"]
        data = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
        columns["image"].append({"bytes": data, "path": None})  # no path: the set must not point into the bundle
        for name in ("question", "answer", "answers", "id"):
            columns[name].append(row[name])
    meta = {"spec": asdict(bundle.spec), "bundle_sha256": bundle.sha256, "test_sha256": bundle.split_sha256["test"],
            "rows": len(chosen), "of_rows": n, "seed": seed if len(chosen) < n else None}
    return pa.Table.from_pydict(columns, schema=_SCHEMA.with_metadata({META_KEY: json.dumps(meta).encode()}))


def _as_eval_set(table: pa.Table, sha256: str | None) -> EvalSet:
    meta = json.loads(table.schema.metadata[META_KEY])
    rows = datasets.Dataset.from_dict(table.to_pydict(), features=FEATURES)
    return EvalSet(TaskSpec(**meta["spec"]), rows, sha256)


def eval_set_of(bundle: ValidatedBundle, *, cache_dir: Path, keep: int | None = None, seed: int = 0) -> EvalSet:
    """The evaluation set `keep_eval_set` would keep, in memory only (benchmarks evaluate in process)."""
    return _as_eval_set(_table(bundle, cache_dir=cache_dir, keep=keep, seed=seed), None)


def keep_eval_set(bundle: ValidatedBundle, store: str, *, cache_dir: Path, keep: int | None = None,
                  seed: int = 0) -> EvalSetRef:
    """Write `bundle`'s evaluation set into the store (once: same content, same file); its reference."""
    table = _table(bundle, cache_dir=cache_dir, keep=keep, seed=seed)
    buf = io.BytesIO()
    # Uncompressed: images are compressed already, and the bytes stay greppable (a scan for
    # training images finds them if they ever were kept). Same rows, same bytes: re-keeping is a no-op.
    pq.write_table(table, buf, compression="none")
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = sha + SUFFIX
    if is_s3(store):
        loc = S3Prefix.parse(store)
        uri = f"{loc.uri}{name}"
        with s3_errors(uri):
            s3_client().put_object(Bucket=loc.bucket, Key=loc.prefix + name, Body=data)
    else:
        target = Path(store) / name
        if not target.is_file():
            write_bytes_atomic(target, data)  # a reader never sees half a set
        uri = str(target.resolve())
    return EvalSetRef(bundle.name, sha, uri, table.num_rows, json.loads(table.schema.metadata[META_KEY])["of_rows"],
                      len(data), bundle.sha256, bundle.split_sha256["test"])


def open_eval_set(ref: EvalSetRef, *, cache_dir: Path) -> EvalSet:
    """Read a kept evaluation set (an S3 one through a local copy under `cache_dir/evalsets`), hash-checked."""
    path = _local_copy(ref, Path(cache_dir) / "evalsets")
    if (sha := file_sha256(path)) != ref.sha256:
        raise EvalSetError(f"{ref.uri}: evaluation set of task {ref.task!r} has sha256 {sha[:16]}…, "
                           f"the lineage recorded {ref.sha256[:16]}…: it was changed or truncated")
    return _as_eval_set(pq.read_table(path), ref.sha256)


def _local_copy(ref: EvalSetRef, cache: Path) -> Path:
    if not is_s3(ref.uri):
        path = Path(ref.uri)
        if not path.is_file():
            raise EvalSetError(f"{ref.uri}: evaluation set of task {ref.task!r} is missing from the store")
        return path
    local = cache / f"{ref.sha256}{SUFFIX}"
    if not local.is_file() or file_sha256(local) != ref.sha256:
        loc = S3Prefix.parse(ref.uri.rsplit("/", 1)[0])
        with s3_errors(ref.uri):
            try:
                data = s3_client().get_object(Bucket=loc.bucket, Key=loc.prefix + local.name)["Body"].read()
            except ClientError as err:
                if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                    raise EvalSetError(f"{ref.uri}: evaluation set of task {ref.task!r} is missing "
                                       "from the store") from None
                raise
        write_bytes_atomic(local, data)
    return local


def delete_eval_set(ref: EvalSetRef, *, cache_dir: Path) -> None:
    """Remove a kept evaluation set from the store and the local cache (a retired task's data)."""
    if is_s3(ref.uri):
        loc = S3Prefix.parse(ref.uri.rsplit("/", 1)[0])
        with s3_errors(ref.uri):
            s3_client().delete_object(Bucket=loc.bucket, Key=loc.prefix + f"{ref.sha256}{SUFFIX}")
    else:
        Path(ref.uri).unlink(missing_ok=True)
    (Path(cache_dir) / "evalsets" / f"{ref.sha256}{SUFFIX}").unlink(missing_ok=True)

