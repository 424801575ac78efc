"""Where bundles live: local folders and `s3://bucket/prefix/` (boto3), plus the download cache.

An S3 bundle is only ever read after its `task.yaml` exists (it is written last), and it is read
by downloading it into a folder named by its listing: every later step (validation, loading with
`datasets`) then runs on a local folder, and a bundle already downloaded is reused. One cache
folder serves the whole data layer: downloads under `<cache_dir>/bundles/`, the `datasets` Arrow
cache under `<cache_dir>/datasets/<bundle sha256>/`. Both are local copies of the user's data,
removed once the bundle's task is decided (see `forget_download`, `loading.forget_local_copies`);
the download of a bundle that fails validation is removed at once (`validate.validate`).

The S3 endpoint comes from `CMOE_S3_ENDPOINT_URL`, else boto3's own `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`; credentials come from the standard AWS chain and are never printed. Every S3
request is bounded (`S3Limits`: connect and read timeouts, tries): an endpoint that is down or
never answers fails with a StorageError naming it, not after botocore's minutes of retries.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from cmoe.data.bundle import TASK_FILE, BundleError, Problem, bundle_files
from cmoe.redact import redact_uri

S3_SCHEME = "s3://"


class StorageError(RuntimeError):
    """The storage itself failed (no such bucket, no credentials, endpoint down), not the bundle."""


@dataclass(frozen=True)
class BundleRef:
    """A complete bundle found in an inbox, with the time its task.yaml arrived."""

    uri: str
    name: str  # the bundle's folder name inside the inbox
    arrived_at: datetime  # UTC; S3: LastModified of task.yaml, local: its mtime


@dataclass(frozen=True)
class S3Prefix:
    """A bucket and a key prefix that is empty or ends with '/'."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Prefix:
        """Split `s3://bucket/some/prefix` into bucket and 'some/prefix/'."""
        bucket, _, prefix = uri.removeprefix(S3_SCHEME).partition("/")
        if not bucket:
            raise ValueError(f"not an S3 URI with a bucket: {uri!r}")
        return cls(bucket, prefix.rstrip("/") + "/" if prefix.strip("/") else "")

    @property
    def uri(self) -> str:
        """The canonical URI, with a trailing '/'."""
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"


def is_s3(uri: str | Path) -> bool:
    """True for `s3://` URIs; everything else is a local path."""
    return str(uri).startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Limits:
    """How long one S3 request may take: each try's connect and read timeouts, and the tries (the
    first included) with botocore's standard back-off between them (under 1, 2, 4 … s).

    botocore's defaults (60 s to connect, 60 s per read, 5 tries) hang a command for minutes on an
    endpoint that accepts connections and never answers. With these defaults one request fails in
    under 50 s at worst (`worst_case_s`); a refused connection fails at once. Set in the environment,
    beside `CMOE_S3_ENDPOINT_URL`: `CMOE_S3_CONNECT_TIMEOUT_S`, `CMOE_S3_READ_TIMEOUT_S`,
    `CMOE_S3_MAX_ATTEMPTS`.
    """

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # between two reads of an answer, not a whole download
    max_attempts: int = 3

    @classmethod
    def from_env(cls) -> S3Limits:
        """The limits the environment sets (defaults for unset variables); StorageError naming a bad one."""
        values = {}
        for name, var, kind in (("connect_timeout_s", "CMOE_S3_CONNECT_TIMEOUT_S", float),
                                ("read_timeout_s", "CMOE_S3_READ_TIMEOUT_S", float),
                                ("max_attempts", "CMOE_S3_MAX_ATTEMPTS", int)):
            if (text := os.environ.get(var)) is None:
                continue
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not 0 < value < math.inf:
                raise StorageError(f"{var}={text!r}: not a positive {'whole ' if kind is int else ''}number")
            values[name] = value
        return cls(**values)

    def botocore_config(self) -> Config:
        """The client config that applies these limits."""
        return Config(connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
                      retries={"total_max_attempts": self.max_attempts, "mode": "standard"})

    def worst_case_s(self) -> float:
        """The longest one request can take before it fails: every try times out to connect and to
        read, plus botocore's back-off between tries (at most 2**i s before retry i, capped at 20 s)."""
        backoff = sum(min(2 ** i, 20) for i in range(self.max_attempts - 1))
        return self.max_attempts * (self.connect_timeout_s + self.read_timeout_s) + backoff


def s3_endpoint() -> str | None:
    """The S3 endpoint cmoe's clients use, as configured (None = AWS's own)."""
    return (os.environ.get("CMOE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def s3_client(limits: S3Limits | None = None):  # noqa: ANN201 - boto3 clients are generated classes, no stable type
    """A boto3 S3 client under `limits` (default: the environment's); `CMOE_S3_ENDPOINT_URL` overrides
    the endpoint (e.g. a local moto server)."""
    # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself.
    return boto3.client("s3", endpoint_url=os.environ.get("CMOE_S3_ENDPOINT_URL") or None,
                        config=(limits or S3Limits.from_env()).botocore_config())


def default_cache_dir() -> Path:
    """Where S3 bundles are downloaded when no cache_dir is given: $CMOE_CACHE_DIR or .cmoe/cache."""
    return Path(os.environ.get("CMOE_CACHE_DIR", ".cmoe/cache"))


@contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore's many error types into StorageError naming `uri` (and, when no answer came, the
    endpoint and the tries made), any URI's password redacted."""
    try:
        yield
    except (BotoConnectionError, HTTPClientError) as err:  # refused, timed out, connection dropped
        n = S3Limits.from_env().max_attempts
        tries = f"{n} tries" if n > 1 else "1 try"
        raise StorageError(redact_uri(f"{uri}: no answer from the S3 endpoint {s3_endpoint() or '(AWS)'} after "
                                      f"{tries} (CMOE_S3_MAX_ATTEMPTS): {err}")) from err
    except (BotoCoreError, ClientError) as err:
        raise StorageError(redact_uri(f"{uri}: {err}")) from err


def _incomplete(uri: str) -> BundleError:
    return BundleError(uri, [Problem(TASK_FILE, "missing: the bundle is incomplete (task.yaml is written last)")])


def read_bundle_file(uri: str | Path, rel: str) -> bytes | None:
    """Bytes of one file of a bundle (e.g. task.yaml) without fetching the rest; None if absent."""
    if not is_s3(uri):
        path = Path(uri) / rel
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None
    loc = S3Prefix.parse(str(uri))
    client = s3_client()
    with s3_errors(loc.uri):
        try:
            return client.get_object(Bucket=loc.bucket, Key=loc.prefix + rel)["Body"].read()
        except ClientError as err:
            if err.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise


def _list_objects(client, loc: S3Prefix) -> dict[str, dict]:  # noqa: ANN001
    """{bundle-relative path: object summary} of every object under the prefix."""
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(loc.prefix) :]
            if rel and not rel.endswith("/"):  # "folder/" keys are console-made markers, not files
                objects[rel] = obj
    return objects


def _unsafe_key(rel: str) -> bool:
    # A key like "train/../../x" would otherwise be downloaded outside the cache folder.
    return "\\" in rel or rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/"))


def _listing_signature(objects: dict[str, dict]) -> str:
    return hashlib.sha256(
        "".join(f"{rel}\t{o['Size']}\t{o['ETag']}\n" for rel, o in sorted(objects.items())).encode()
    ).hexdigest()


def bundle_fingerprint(uri: str | Path) -> str:
    """What a bundle holds now, without reading its files: changes when any entry is added, removed,
    rewritten or re-linked. S3: the listing (keys, sizes, ETags); local: every entry's path, type,
    size, mtime and link target, links and special files included (never followed, never opened).

    It names a bundle that cannot be hashed (a symlink inside, a key that cannot be a file), so the
    watcher can remember that it refused it until the user changes it.
    """
    if is_s3(uri):
        loc = S3Prefix.parse(str(uri))
        with s3_errors(loc.uri):
            return _listing_signature(_list_objects(s3_client(), loc))
    root, lines = Path(uri), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = os.lstat(path)
            target = os.readlink(path) if path.is_symlink() else ""
            lines.append(f"{path.relative_to(root).as_posix()}\t{st.st_mode:o}\t{st.st_size}\t{st.st_mtime_ns}\t{target}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def check_inbox(inbox_uri: str | Path) -> None:
    """Raise StorageError unless the inbox can be listed: a local folder that exists (an S3 prefix is
    checked by listing it: a missing bucket is a StorageError there)."""
    if not is_s3(inbox_uri):
        path = Path(inbox_uri)
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise StorageError(f"inbox {path} {what} (create it, or point --inbox / the config's `inbox` at one)")


def fetch_bundle(uri: str | Path, *, cache_dir: Path | None = None) -> Path:
    """Local folder of a bundle: a local path as is; an S3 bundle downloaded to `<cache_dir>/bundles/<listing>/`.

    The download folder is named by the listing's signature (relative paths, sizes, ETags), which
    identifies the content without reading it: a bundle already downloaded is reused, under any
    prefix, and validation hashes the files once. Raises BundleError when the S3 bundle has no
    task.yaml yet (nothing is downloaded) or has keys that cannot be files, StorageError when S3 fails.
    """
    if not is_s3(uri):
        return Path(uri)
    try:
        loc = S3Prefix.parse(str(uri))
    except ValueError as err:  # `s3://` or `s3:///x`: a bad URI, not a storage failure (never retried)
        raise BundleError(str(uri), [Problem(".", str(err))]) from None
    cache = (cache_dir or default_cache_dir()) / "bundles"
    client = s3_client()
    with s3_errors(loc.uri):
        objects = _list_objects(client, loc)
        if TASK_FILE not in objects:
            raise _incomplete(loc.uri)
        if bad := sorted(rel for rel in objects if _unsafe_key(rel)):
            raise BundleError(loc.uri, [Problem(rel, "S3 key is not a safe relative file path") for rel in bad])
        # An object `train` beside `train/...` cannot be both a file and a folder on disk.
        folders = {rel.rsplit("/", 1)[0] for rel in objects if "/" in rel}
        folders |= {f.rsplit("/", i)[0] for f in list(folders) for i in range(1, f.count("/") + 1)}
        if clash := sorted(rel for rel in objects if rel in folders):
            raise BundleError(loc.uri, [Problem(rel, f"S3 object {rel!r} is also the folder of other objects "
                                                     f"({rel}/...): a bundle's files cannot be both") for rel in clash])
        final = cache / _listing_signature(objects)
        if final.is_dir():
            return final
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            for rel, obj in objects.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                client.download_file(loc.bucket, obj["Key"], str(tmp / rel))
            try:
                os.rename(tmp, final)  # atomic: readers see a complete folder or none
            except OSError:
                if not final.is_dir():
                    raise
                # Same content was downloaded meanwhile by another process: keep that copy.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def forget_download(bundle_root: str | Path, *, cache_dir: Path | None = None) -> bool:
    """Delete the local download of an S3 bundle (nothing for a local folder); True if one was removed."""
    root = Path(bundle_root).resolve()
    cache = ((cache_dir or default_cache_dir()) / "bundles").resolve()
    if root.parent != cache or not root.is_dir():
        return False  # the user's own folder, or already gone: never ours to delete
    shutil.rmtree(root)
    return True


def list_bundles(inbox_uri: str | Path) -> list[BundleRef]:
    """Complete bundles (task.yaml present) directly inside an inbox, oldest task.yaml first."""
    refs = _list_s3_bundles(str(inbox_uri)) if is_s3(inbox_uri) else _list_local_bundles(Path(inbox_uri))
    return sorted(refs, key=lambda r: (r.arrived_at, r.uri))


def _list_local_bundles(inbox: Path) -> list[BundleRef]:
    refs = []
    for child in inbox.iterdir() if inbox.is_dir() else ():
        # Dot-folders are writers' temporary folders; links are never followed.
        if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
            continue
        task = child / TASK_FILE
        if task.is_file() and not task.is_symlink():
            arrived = datetime.fromtimestamp(task.stat().st_mtime, UTC)
            refs.append(BundleRef(str(child), child.name, arrived))
    return refs


def _list_s3_bundles(inbox_uri: str) -> list[BundleRef]:
    loc = S3Prefix.parse(inbox_uri)
    client = s3_client()
    refs = []
    with s3_errors(loc.uri):
        # One level down only ("Delimiter"), then one HEAD per candidate: cheaper than listing images.
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix, Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                try:
                    head = client.head_object(Bucket=loc.bucket, Key=common["Prefix"] + TASK_FILE)
                except ClientError as err:
                    if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                        continue  # incomplete: task.yaml not written yet
                    raise
                name = posixpath.basename(common["Prefix"].rstrip("/"))
                refs.append(BundleRef(f"{S3_SCHEME}{loc.bucket}/{common['Prefix']}", name, head["LastModified"]))
    return refs


def upload_bundle(local: Path, s3_uri: str) -> str:
    """Copy a local bundle to S3, task.yaml last so readers never see a partial bundle; returns the URI."""
    loc = S3Prefix.parse(s3_uri)
    files = bundle_files(local)  # refuses symlinks and special files
    ordered = [rel for rel in files if rel != TASK_FILE] + [rel for rel in files if rel == TASK_FILE]
    client = s3_client()
    with s3_errors(loc.uri):
        for rel in ordered:
            client.upload_file(str(local / rel), loc.bucket, loc.prefix + rel)
    return loc.uri


PROCESSED_DIR = ".processed"  # inside an inbox: where decided bundles are moved (dot: the watcher skips it)


def put_aside(uri: str, inbox: str, action: str) -> str | None:
    """Move a decided bundle out of the inbox into `<inbox>/.processed/` ("move") or delete it
    ("delete"); "keep" leaves it. Returns where it went (None when kept or deleted).

    task.yaml goes first in either case, so a half-finished move or delete is an incomplete bundle
    that nobody reads, never a damaged complete one.
    """
    if action == "keep":
        return None
    name = posixpath.basename(str(uri).rstrip("/"))
    if not is_s3(uri):
        src = Path(uri)
        if action == "delete":
            (src / TASK_FILE).unlink(missing_ok=True)
            shutil.rmtree(src)
            return None
        dest = Path(inbox) / PROCESSED_DIR / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dest)  # one atomic rename on the same file system
        return str(dest)
    loc, client = S3Prefix.parse(str(uri)), s3_client()
    dest = S3Prefix.parse(f"{S3Prefix.parse(inbox).uri}{PROCESSED_DIR}/{name}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}/")
    with s3_errors(loc.uri):
        objects = _list_objects(client, loc)
        ordered = [rel for rel in objects if rel == TASK_FILE] + [rel for rel in objects if rel != TASK_FILE]
        for rel in ordered:
            if action == "move":
                client.copy_object(Bucket=dest.bucket, Key=dest.prefix + rel,
                                   CopySource={"Bucket": loc.bucket, "Key": loc.prefix + rel})
            client.delete_object(Bucket=loc.bucket, Key=loc.prefix + rel)
    return dest.uri if action == "move" else None
