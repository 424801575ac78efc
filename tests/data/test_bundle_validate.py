"""Validation: valid bundles pass; each problem is reported with its `path:line:` location."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmoe.data.bundle import MAX_PIXELS
from cmoe.data.validate import validate, validate_bundle

from .helpers import header_only_png, png_bytes, snapshot


def edit_line(path: Path, lineno: int, fn: Callable[[dict], dict | str]) -> None:
    """Replace line `lineno` (1-based) of a JSONL file by fn(parsed row); a str result is written raw."""
    lines = path.read_text().splitlines()
    new = fn(json.loads(lines[lineno - 1]))
    lines[lineno - 1] = new if isinstance(new, str) else json.dumps(new)
    path.write_text("\n".join(lines) + "\n")


def messages(root: Path) -> list[str]:
    report = validate_bundle(root)
    assert not report.ok and report.sha256 is None
    return [str(p) for p in report.problems]


@pytest.mark.parametrize("layout", ["imagefolder", "parquet", "parquet-bytes"])
def test_valid_bundle_reports_spec_counts_and_hash(make_bundle, layout: str) -> None:
    report = validate(make_bundle(layout=layout))
    assert report.ok, report.problems
    assert (report.spec.name, report.counts, report.layouts["train"]) == (
        "tiny-color", {"train": 4, "test": 3}, layout.removesuffix("-bytes"))
    assert len(report.sha256) == 64


def _meta(root: Path, split: str = "train") -> Path:
    return root / split / "metadata.jsonl"


# (mutation of a valid ImageFolder bundle, text the report must contain)
CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "missing-field": (lambda r: edit_line(_meta(r), 2, lambda d: {k: v for k, v in d.items() if k != "answer"}),
                      "train/metadata.jsonl:2: field 'answer' is missing"),
    "extra-field": (lambda r: edit_line(_meta(r), 3, lambda d: {**d, "colour": "red"}),
                    "train/metadata.jsonl:3: unknown field 'colour'"),
    "wrong-type": (lambda r: edit_line(_meta(r), 1, lambda d: {**d, "answer": 7}),
                   "train/metadata.jsonl:1: field 'answer' must be a non-empty string, got int 7"),
    "wrong-answers": (lambda r: edit_line(_meta(r), 1, lambda d: {**d, "answers": "red"}),
                      "train/metadata.jsonl:1: field 'answers' must be a non-empty list"),
    "bad-json": (lambda r: edit_line(_meta(r), 2, lambda d: json.dumps(d)[:-2]),
                 "train/metadata.jsonl:2: invalid JSON"),
    "not-object": (lambda r: edit_line(_meta(r), 2, lambda d: "[1, 2]"),
                   "train/metadata.jsonl:2: must be a JSON object"),
    "missing-image": (lambda r: (r / "test/images/1.png").unlink(),
                      "test/metadata.jsonl:2: image 'images/1.png' not found"),
    "corrupt-image": (lambda r: (r / "test/images/1.png").write_bytes(os.urandom(100)),
                      "test/images/1.png: cannot decode image"),
    "truncated-image": (lambda r: (r / "test/images/1.png").write_bytes(png_bytes((1, 2, 3))[:45]),
                        "test/images/1.png: cannot decode image"),
    "absolute": (lambda r: edit_line(_meta(r), 2, lambda d: {**d, "file_name": str(r / "train/images/1.png")}),
                 "train/metadata.jsonl:2: file_name '/"),
    "traversal": (lambda r: edit_line(_meta(r), 3, lambda d: {**d, "file_name": "../test/images/0.png"}),
                  "train/metadata.jsonl:3: file_name '../test/images/0.png' escapes the split folder"),
    "symlink-escape": (lambda r: ((r / "train/images/0.png").unlink(),
                                  os.symlink(r / "test/images/0.png", r / "train/images/0.png")),
                       "train/images/0.png: symlink whose target resolves outside the split folder"),
    "symlink-inside": (lambda r: ((r / "train/images/0.png").unlink(),
                                  os.symlink("1.png", r / "train/images/0.png")),
                       "train/images/0.png: symlink: bundles hold regular files only"),
    "empty-split": (lambda r: _meta(r, "test").write_text(""), "test: split is empty"),
    "missing-split": (lambda r: shutil.rmtree(r / "test"), "test: split is missing"),
    "duplicate-id": (lambda r: edit_line(_meta(r), 3, lambda d: {**d, "id": "train-q0"}),
                     "train/metadata.jsonl:3: duplicate id 'train-q0' (first at train/metadata.jsonl:1)"),
    # The last row has no id, so it gets the default "train-3"; an explicit one may not clash with it.
    "duplicate-default-id": (lambda r: edit_line(_meta(r), 1, lambda d: {**d, "id": "train-3"}),
                             "train/metadata.jsonl:4: duplicate id 'train-3'"),
    "oversized": (lambda r: (r / "train/images/2.png").write_bytes(header_only_png(5000, 5000)),
                  f"train/images/2.png: image is 5000x5000 px, over the {MAX_PIXELS} px limit"),
    "bomb": (lambda r: (r / "train/images/2.png").write_bytes(header_only_png(40000, 40000)),
             "train/images/2.png: possible decompression bomb"),
    "no-task-file": (lambda r: (r / "task.yaml").unlink(), "task.yaml: missing: the bundle is incomplete"),
    "bad-name": (lambda r: (r / "task.yaml").write_text(
        "name: Bad Name!\ndescription: x\nformat_version: 1\nmetric: exact_match\n"),
        "task.yaml:1: name 'Bad Name!' must match"),
    "long-name": (lambda r: (r / "task.yaml").write_text(
        f"name: {'a' * 65}\ndescription: x\nformat_version: 1\nmetric: exact_match\n"), "task.yaml:1: name 'aaa"),
    "bad-version": (lambda r: (r / "task.yaml").write_text(
        "name: ok\ndescription: x\nformat_version: 99\nmetric: exact_match\n"),
        "task.yaml:3: format_version 99 is not supported"),
    "bad-metric": (lambda r: (r / "task.yaml").write_text(
        "name: ok\ndescription: x\nformat_version: 1\nmetric: bleu\n"), "task.yaml:4: metric 'bleu' is unknown"),
    "bad-instruction": (lambda r: (r / "task.yaml").write_text(
        "name: ok\ndescription: x\nformat_version: 1\nmetric: contains\ninstruction: 'Q: {q}'\n"),
        "task.yaml:5: instruction must contain '{question}'"),
    "task-missing-field": (lambda r: (r / "task.yaml").write_text("name: ok\nformat_version: 1\nmetric: contains\n"),
                           "task.yaml: required field 'description' is missing"),
    "task-bad-yaml": (lambda r: (r / "task.yaml").write_text("name: [ok\n"), "task.yaml:2: invalid YAML"),
    "both-layouts": (lambda r: (r / "test/test.parquet").write_bytes(b"x"), "test: holds both metadata.jsonl"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_problem_is_reported_with_location(bundle: Path, case: str) -> None:
    mutate, expected = CASES[case]
    mutate(bundle)
    found = messages(bundle)
    assert any(m.startswith(expected) for m in found), found


def test_every_problem_is_reported_not_just_the_first(bundle: Path) -> None:
    for case in ("missing-field", "corrupt-image", "bad-metric", "oversized"):
        CASES[case][0](bundle)
    found = messages(bundle)
    for case in ("missing-field", "corrupt-image", "bad-metric", "oversized"):
        assert any(m.startswith(CASES[case][1]) for m in found), (case, found)


def test_parquet_problems_are_located_by_row(make_bundle) -> None:
    root = make_bundle(layout="parquet")
    path = root / "train/train.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": b"not an image", "path": None}
    table = table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table.append_column("extra", pa.array(["x"] * len(table))), path)
    pq.write_table(pq.read_table(root / "test/test.parquet").drop(["answer"]), root / "test/test.parquet")
    found = messages(root)
    assert "train/train.parquet: unknown column 'extra' (allowed: image, question, answer, answers, id)" in found
    assert "test/test.parquet: column 'answer' is missing" in found
    table = pq.read_table(path).drop(["extra"])
    pq.write_table(table, path)
    assert any(m.startswith("train/train.parquet:2: image: cannot decode image") for m in messages(root))


def test_validate_never_modifies_the_bundle(bundle: Path, make_bundle) -> None:
    CASES["corrupt-image"][0](bundle)  # an invalid bundle exercises every reader too
    parquet = make_bundle("pq", layout="parquet")
    for root in (bundle, parquet):
        before = snapshot(root)
        validate(root)
        assert snapshot(root) == before
