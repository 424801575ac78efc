"""Write task bundles in the ImageFolder layout, atomically, with task.yaml last.

A reader that sees `task.yaml` may assume the bundle is complete, so the bundle is assembled in a
temporary sibling folder and renamed into place in one step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, records in splits.items():
            _write_split(tmp / split, split, records)
        # Written last: its presence is the "bundle complete" signal.
        (tmp / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
