"""Write task bundles in the ImageFolder layout, and deliver them into an inbox: complete or not at all.

A reader that sees `task.yaml` may assume the bundle is complete, so a local bundle is assembled
in a temporary dot-folder beside it (invisible to the watcher) and renamed into place in one step;
on S3, where there is no rename, task.yaml is uploaded last.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from cmoe.data.bundle import TASK_FILE, bundle_files
from cmoe.data.storage import is_s3, upload_bundle
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
        return upload_bundle(bundle, f"{str(inbox).rstrip('/')}/{bundle.name}/")
    target = Path(inbox) / bundle.name
    if not target.exists():
        files = bundle_files(bundle)
        with atomic_dir(target) as tmp:
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle / rel, tmp / rel)
    return str(target)


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
