"""Bundles a user gets wrong in ways the format's own checks did not foresee: each is one clear
problem naming the file and field (never a traceback, a hang or a MemoryError)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.data.validate import parse_task_yaml, validate

runner = CliRunner()
REST = "description: x\nformat_version: 1\nmetric: exact_match\n"


def alias_bomb() -> str:
    """~400 bytes of YAML whose `name` expands to 9**9 (387 million) strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join([*lines, "name: *i", REST])


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(bundle: Path) -> None:
    (bundle / "task.yaml").write_text(alias_bomb())
    start = time.monotonic()
    result = runner.invoke(app, ["data", "validate", str(bundle)])
    assert time.monotonic() - start < 10
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stdout.splitlines() == ["task.yaml:2: invalid YAML (aliases (*name) are not allowed in task.yaml)"]
    assert len(result.output) < 1000


def test_a_huge_task_yaml_is_refused_by_its_size() -> None:
    spec, problems = parse_task_yaml("name: sq\n" + REST + "#" * 100_000 + "\n")
    assert spec is None and "over the 65536 limit" in problems[0].message


def test_a_duplicate_key_is_refused_not_silently_the_last_value() -> None:
    spec, problems = parse_task_yaml("name: sq\nname: other\n" + REST)
    assert spec is None
    assert [str(p) for p in problems] == ["task.yaml:2: invalid YAML (key 'name' is given twice (first on line 1))"]


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    spec, problems = parse_task_yaml('name: "sq\\n"\n' + REST)
    assert spec is None and str(problems[0]).startswith("task.yaml:1: name 'sq\\n' must match")


def test_a_long_bad_value_is_shown_bounded() -> None:
    _, problems = parse_task_yaml("name: [" + ",".join(["x" * 50] * 10_000) + "]\n" + REST)
    assert len(str(problems[0])) < 250


@pytest.mark.parametrize("template", ["{question:d}", "{question!x}", "{question:>99999999999}", "{question!r}",
                                      "{question.upper}", "{question[0]}", "{q}", "no field"])
def test_an_instruction_must_use_plain_question_fields_only(template: str) -> None:
    spec, problems = parse_task_yaml(f"name: sq\ninstruction: '{template}'\n" + REST)
    assert spec is None and len(problems) == 1
    assert str(problems[0]).startswith("task.yaml:2: instruction ")


def test_a_plain_instruction_still_passes() -> None:
    spec, problems = parse_task_yaml("name: sq\ninstruction: 'Answer briefly. {question} ({question})'\n" + REST)
    assert problems == [] and spec.instruction == "Answer briefly. {question} ({question})"


def test_the_bundle_validator_reports_the_instruction_problem(bundle: Path) -> None:
    (bundle / "task.yaml").write_text("name: sq\ninstruction: '{question:>99999999999}'\n" + REST)
    report = validate(bundle)
    assert not report.ok and report.problems[0].path == "task.yaml" and report.problems[0].line == 2


# ------------------------------------------------------------------ rows: Parquet and JSON
def corrupt_a_data_page(path: Path) -> None:
    """Overwrite the header of the 4th row group's first page: the footer stays readable."""
    import pyarrow.parquet as pq

    offset = pq.ParquetFile(path).metadata.row_group(3).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


def write_parquet(path: Path, n: int, **columns_extra) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .helpers import example_rows

    rows = example_rows("train", n)
    names = ["image", "question", "answer"]
    arrays = [pa.array([{"bytes": r["image"], "path": None} for r in rows]), pa.array([r["question"] for r in rows]),
              pa.array([r["answer"] for r in rows])]
    for name, values in columns_extra.items():
        names.append(name.rstrip("_"))
        arrays.append(pa.array(values(rows)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path, row_group_size=100)


def test_a_parquet_split_with_a_corrupt_page_is_a_problem_not_an_exception(make_bundle) -> None:
    root = make_bundle(layout="parquet")
    write_parquet(root / "train/train.parquet", 600)
    corrupt_a_data_page(root / "train/train.parquet")
    report = validate(root)
    assert [p.path for p in report.problems] == ["train/train.parquet"]
    assert str(report.problems[0]).startswith("train/train.parquet: cannot read Parquet after row 256 (corrupt data: ")


def test_a_corrupt_parquet_is_not_retried_as_transient_io(make_bundle) -> None:
    from types import SimpleNamespace

    from cmoe.data.bundle import BundleError
    from cmoe.data.validate import open_bundle
    from flows.continual import _transient

    root = make_bundle(layout="parquet")
    write_parquet(root / "train/train.parquet", 600)
    corrupt_a_data_page(root / "train/train.parquet")
    with pytest.raises(BundleError) as caught:
        open_bundle(root)

    def failed(err: BaseException) -> SimpleNamespace:
        def result() -> None:
            raise err
        return SimpleNamespace(result=result)

    assert _transient(None, None, failed(caught.value)) is False
    assert _transient(None, None, failed(OSError("Couldn't deserialize thrift"))) is False  # pyarrow's: no errno
    assert _transient(None, None, failed(OSError(5, "Input/output error"))) is True  # the disk's: retried


def test_a_duplicate_parquet_column_is_named(make_bundle) -> None:
    root = make_bundle(layout="parquet")
    write_parquet(root / "train/train.parquet", 4, answer_=lambda rows: [r["answer"] for r in rows])
    report = validate(root)
    assert [str(p) for p in report.problems] == [
        "train/train.parquet: duplicate column name(s) 'answer': every column must be named once"]


def test_json_nested_100000_deep_is_a_located_problem(bundle: Path) -> None:
    meta = bundle / "train/metadata.jsonl"
    lines = meta.read_text().splitlines()
    lines[1] = '{"file_name": "images/1.png", "question": "q", "answer": ' + "[" * 100_000 + "]" * 100_000 + "}"
    meta.write_text("\n".join(lines) + "\n")
    assert [str(p) for p in validate(bundle).problems] == [
        "train/metadata.jsonl:2: invalid row: JSON nested too deeply"]


def test_yaml_nested_too_deep_is_a_problem() -> None:
    spec, problems = parse_task_yaml("name: " + "[" * 20_000 + "]" * 20_000 + "\n" + REST)
    assert spec is None and problems[0].path == "task.yaml"


def test_control_characters_in_a_problem_are_escaped(bundle: Path) -> None:
    (bundle / "task.yaml").write_text('name: "x\\e[2J\\a"\n' + REST)
    result = runner.invoke(app, ["data", "validate", str(bundle)])
    assert result.exit_code == 1 and "\x1b" not in result.output and "\x07" not in result.output


# ------------------------------------------------------------------ S3 layouts
def test_an_s3_uri_without_a_bucket_is_a_problem(tmp_path: Path) -> None:
    for uri in ("s3://", "s3:///prefix/"):
        result = runner.invoke(app, ["data", "validate", uri, "--cache-dir", str(tmp_path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert result.stdout.splitlines() == [f".: not an S3 URI with a bucket: {uri!r}"]


@pytest.mark.services
def test_an_s3_object_beside_a_folder_of_the_same_name_is_refused(bundle: Path, s3_bucket: str,
                                                                    tmp_path: Path) -> None:
    from cmoe.data.storage import s3_client, upload_bundle

    uri = upload_bundle(bundle, f"s3://{s3_bucket}/clash")
    s3_client().put_object(Bucket=s3_bucket, Key="clash/train", Body=b"a file named like the split folder")
    s3_client().put_object(Bucket=s3_bucket, Key="clash/test/images", Body=b"and one like an image folder")
    report = validate(uri, cache_dir=tmp_path)
    assert [p.path for p in report.problems] == ["test/images", "train"]
    assert "is also the folder of other objects" in report.problems[0].message
    assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())  # nothing downloaded


# ------------------------------------------------------------------ images, synth, info
def test_a_16_bit_png_is_refused_not_clipped_to_white(bundle: Path) -> None:
    import numpy as np
    from PIL import Image

    image = bundle / "train/images/0.png"
    Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)).save(image)
    assert Image.open(image).mode == "I;16"
    assert [str(p) for p in validate(bundle).problems] == [
        "train/images/0.png: image has more than 8 bits per channel (mode I;16): save it as 8-bit (RGB or "
        "grayscale); it would be clipped to white"]


@pytest.mark.parametrize("option", ["--train", "--test"])
def test_synth_refuses_a_split_size_its_validator_would_refuse(option: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "out"), option, "-1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [f"error: {option} must be at least 1 (got -1): a bundle's splits cannot "
                                          "be empty"]
    assert not (tmp_path / "out").exists()


def test_info_strips_terminal_escape_sequences_from_the_description(bundle: Path) -> None:
    (bundle / "task.yaml").write_text('name: sq\ndescription: "Red \\e[31mtext\\e[0m, a title \\e]0;pwned\\a and a '
                                      'bell \\a"\nformat_version: 1\nmetric: exact_match\n')
    result = runner.invoke(app, ["data", "info", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "description:    Red text, a title  and a bell \\x07" in result.stdout


def test_a_fingerprint_changes_with_the_bundle_even_one_with_a_symlink(bundle: Path) -> None:
    import os

    from cmoe.data.storage import bundle_fingerprint

    image = bundle / "train/images/1.png"
    image.unlink()
    os.symlink(bundle / "train/images/0.png", image)
    before = bundle_fingerprint(bundle)  # hashing it is refused; fingerprinting never follows the link
    assert bundle_fingerprint(bundle) == before
    image.unlink()
    os.symlink(bundle / "train/images/2.png", image)
    assert bundle_fingerprint(bundle) != before


def test_a_question_over_the_text_limit_is_a_located_problem(bundle: Path) -> None:
    import json

    meta = bundle / "train/metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[2]["question"] = "why " * 600
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [str(p) for p in validate(bundle).problems] == [
        "train/metadata.jsonl:3: field 'question' is 2400 characters, over the 2000 limit"]
