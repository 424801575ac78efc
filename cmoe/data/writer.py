"""Write task bundles in the ImageFolder layout, and deliver them into an inbox: complete or not at all.

A reader that sees `task.yaml` may assume the bundle is complete, so a local bundle is assembled
in a temporary dot-folder beside it (invisible to the watcher) and renamed into place in one step;
on S3, where there is no rename, task.yaml is uploaded last.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from cmoe.data.bundle import TASK_FILE, bundle_files, bundle_sha256
from cmoe.data.storage import S3Prefix, fetch_bundle, is_s3, read_bundle_file, upload_bundle
from cmoe.files import atomic_dir


@dataclass
class Record:
    """One example: an image and the question/answer pair asked about it."""

    image: Image.Image
    question: str
    answer: str
    answers: list[str] = field(default_factory=list)  # other accepted answers (empty = [answer])


def write_bundle(out: Path, task: dict, splits: dict[str, list[Record]]) -> Path:
    """Write `splits` (e.g. train/test) and `task` (the task.yaml mapping) as a bundle at `out`."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; bundles are immutable, choose another folder")
    with atomic_dir(out) as tmp:
        for split, records in splits.items():
            _write_split(tmp / split, split, records)
        # Written last: its presence is the "bundle complete" signal.
        (tmp / TASK_FILE).write_text(yaml.safe_dump(task, sort_keys=False))
    return out


def deliver_bundle(bundle: Path, inbox: str | Path) -> str:
    """Put a finished bundle into an inbox (folder or s3://) as `<inbox>/<bundle name>/`; its URI there.

    A bundle already in a local inbox is left as it is (bundles are immutable); links and special
    files are refused, as the bundle's hash refuses them.
    """
    bundle = Path(bundle)
    if is_s3(inbox):
        return upload_bundle(bundle, inbox_uri(inbox, bundle.name))
    target = Path(inbox_uri(inbox, bundle.name))
    if not target.exists():
        files = bundle_files(bundle)
        with atomic_dir(target) as tmp:
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle / rel, tmp / rel)
    return str(target)


def inbox_uri(inbox: str | Path, name: str) -> str:
    """Where a bundle called `name` lives in an inbox: `<inbox>/<name>` (S3: `s3://bucket/prefix/<name>/`)."""
    if is_s3(inbox):
        return S3Prefix.parse(f"{str(inbox).rstrip('/')}/{name}/").uri
    return str(Path(inbox) / name)


def delivered_sha256(inbox: str | Path, name: str, *, cache_dir: Path | None = None) -> str | None:
    """sha256 of the complete bundle `name` already in the inbox; None when there is none (on S3, also a
    half-finished upload: delivering again completes it). A local folder of that name that is not a
    complete bundle is refused (FileExistsError): it is not ours to replace."""
    uri = inbox_uri(inbox, name)
    if read_bundle_file(uri, TASK_FILE) is None:
        if not is_s3(uri) and os.path.lexists(uri):
            raise FileExistsError(f"{uri}: exists but is not a complete bundle (no {TASK_FILE}); "
                                  "remove it or rename the bundle")
        return None
    return bundle_sha256(fetch_bundle(uri, cache_dir=cache_dir))


def _write_split(folder: Path, split: str, records: list[Record]) -> None:
    (folder / "images").mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, r in enumerate(records):
            name = f"images/{i:05d}.png"
            r.image.save(folder / name)
            row = {"file_name": name, "question": r.question, "answer": r.answer, "id": f"{split}-{i:05d}"}
            if r.answers:
                row["answers"] = r.answers
            f.write(json.dumps(row) + "\n")
