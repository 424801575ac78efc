"""Fuzzing the bundle reader: whatever a bundle folder holds, `open_bundle` accepts it or raises
BundleError (never another exception), and `cmoe data validate` answers without a traceback.

Generated with hypothesis: task.yaml documents (known and random keys; values of every JSON type,
unicode, huge and 5 000-digit numbers, nesting; random text; bytes that are not UTF-8), ImageFolder
rows (random fields and values, unsafe file names, lines that are not JSON or not UTF-8) with
generated images (valid of any size and mode, truncated, random bytes, bomb headers), Parquet
splits (random columns and types, duplicate names) and valid Parquet files truncated or with a
byte changed. Deterministic (derandomize, no example database) and bounded so the module stays
under 10 s.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.data.bundle import BundleError
from cmoe.data.validate import open_bundle

from .helpers import TASK_YAML, example_rows, header_only_png, write_imagefolder_split, write_parquet_split


def fuzz(examples: int) -> Callable:
    """Hypothesis settings of this module: the same examples on every run, none stored, no time limit per example."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def opens_or_refuses(root: Path) -> None:
    """The property: a ValidatedBundle, or a BundleError listing problems; any other exception fails."""
    try:
        open_bundle(root)
    except BundleError as err:
        assert err.problems, "a refusal names at least one problem"


def bundle(files: dict[str, bytes]) -> Callable[[Callable[[Path], None]], None]:
    """Run `check(root)` on a fresh valid bundle (ImageFolder train, Parquet test) with `files` written over it."""
    def run(check: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "bundle"
            write_imagefolder_split(root / "train", example_rows("train", 3))
            write_parquet_split(root / "test", "test", example_rows("test", 2))
            (root / "task.yaml").write_text(TASK_YAML)
            for rel, data in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
            check(root)
    return run


# ---------------------------------------------------------------------------- values
huge_digits = st.integers(4301, 6000).map(lambda n: "9" * n)  # past Python's int-to-str limit (4300 digits)
numbers = st.integers() | st.integers(min_value=10**18, max_value=10**80) | st.floats()
json_values = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4),
                           max_leaves=12)


def as_yaml(value: Any) -> str:
    """A value as YAML flow text (JSON is YAML flow syntax); NaN/Infinity stay tokens YAML reads as text."""
    return json.dumps(value, ensure_ascii=False)


TASK_FIELDS = ("name", "description", "format_version", "metric", "instruction")
VALID_TASK = {"name": "tiny-color", "description": "Name the colour.", "format_version": 1, "metric": "exact_match"}
yaml_values = (json_values.map(as_yaml) | huge_digits | st.text(max_size=40)
               | st.sampled_from(["{question}", "{question:d}", "{question!x}", "{question:>99999999999}", "{", "}{",
                                  "&a x", "*a", "!!python/object:os.system", "'sq\n'", "~", "0x1F", "1e999"]))
task_keys = st.sampled_from([*TASK_FIELDS, "Name", "", "extra"]) | st.text(max_size=12)


@st.composite
def task_yaml(draw: st.DrawFn) -> bytes:
    """A task.yaml: the valid fields with some replaced, removed or added, or any text, or bytes."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return TASK_YAML.encode() + draw(st.binary(min_size=1, max_size=40))  # mostly not UTF-8
    lines = {k: as_yaml(v) for k, v in VALID_TASK.items()}
    for key in draw(st.lists(task_keys, max_size=4)):
        lines[key] = draw(yaml_values)
    for key in draw(st.lists(st.sampled_from(TASK_FIELDS), max_size=2)):
        lines.pop(key, None)
    # (nesting past the recursion limit costs ~2 s a document: tests/data/test_bad_bundles.py has it once)
    nested = draw(st.sampled_from(["", "", "deeper: [[[[[[[[1]]]]]]]]\n", "[" * 100]))
    return ("".join(f"{as_yaml(k)}: {v}\n" for k, v in lines.items()) + nested).encode("utf-8", "surrogatepass")


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """An image file: valid of any size and mode, truncated, random bytes, or a header claiming a huge size."""
    kind = draw(st.sampled_from(["valid", "valid", "truncated", "random", "bomb"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "bomb":
        return header_only_png(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    mode, fmt = draw(st.sampled_from([("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"),
                                      ("I;16", "PNG"), ("RGB", "JPEG"), ("CMYK", "JPEG"), ("F", "TIFF"),
                                      ("RGB", "GIF"), ("RGB", "BMP"), ("RGB", "WEBP")]))
    buf = io.BytesIO()
    Image.new(mode, (draw(st.integers(1, 40)), draw(st.integers(1, 40)))).save(buf, format=fmt)
    data = buf.getvalue()
    return data[: draw(st.integers(0, len(data) - 1))] if kind == "truncated" else data


ROW_FIELDS = ("file_name", "question", "answer", "answers", "id")
file_names = st.sampled_from(["images/0.png", "images/1.png", "images/2.png", "images/../images/0.png", "../x.png",
                              "/etc/passwd.png", "images\\0.png", "images/0.txt", "images/none.png", "images/\x00.png",
                              "images/\ud800.png", "images/\udc80.png", "images", "", "."]) | json_values
row_values = json_values | st.text(min_size=2001, max_size=2100)  # over the text limit too


@st.composite
def metadata_line(draw: st.DrawFn) -> bytes:
    """One metadata.jsonl line: a row with random fields and values, or text that is not a JSON object, or not UTF-8."""
    kind = draw(st.sampled_from(["row", "row", "row", "json", "text", "bytes"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "text":
        return draw(st.text(max_size=60)).replace("\n", " ").encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=30)).replace(b"\n", b" ") + b"\xff"
    row = {"file_name": draw(file_names), "question": "what colour is it?", "answer": "red"}
    for key in draw(st.lists(st.sampled_from(ROW_FIELDS) | st.text(max_size=8), max_size=3)):
        row[key] = draw(row_values)
    return json.dumps(row).encode()  # ensure_ascii: a lone surrogate travels as its \\u escape


# ---------------------------------------------------------------------------- Parquet
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLUMN_TYPES = [pa.string(), pa.large_string(), pa.int64(), pa.float64(), pa.binary(), pa.bool_(),
                pa.list_(pa.string()), pa.list_(pa.int64()), IMAGE_STRUCT, pa.struct([("path", pa.string())])]


def column_values(dtype: pa.DataType, n: int, images: st.SearchStrategy[bytes]) -> st.SearchStrategy[list]:
    """n values of `dtype` (None included) for one generated column."""
    one = {pa.string(): st.text(max_size=20), pa.large_string(): st.text(max_size=20),
           pa.int64(): st.integers(-2**63, 2**63 - 1), pa.float64(): st.floats(), pa.binary(): images,
           pa.bool_(): st.booleans(),
           pa.list_(pa.string()): st.lists(st.text(max_size=8), max_size=3),
           pa.list_(pa.int64()): st.lists(st.integers(0, 9), max_size=3),
           IMAGE_STRUCT: st.fixed_dictionaries({"bytes": st.none() | images, "path": st.none() | st.text(max_size=8)}),
           pa.struct([("path", pa.string())]): st.fixed_dictionaries({"path": st.text(max_size=8)})}[dtype]
    return st.lists(st.none() | one, min_size=n, max_size=n)


@st.composite
def parquet_split(draw: st.DrawFn) -> bytes:
    """A Parquet file with random columns (names maybe repeated, types maybe wrong) and 0 to 4 rows."""
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.sampled_from(["image", "question", "answer", "answers", "id"]) | st.text(max_size=6),
                          min_size=1, max_size=6))
    arrays = []
    for _ in names:
        dtype = draw(st.sampled_from(COLUMN_TYPES))
        arrays.append(pa.array(draw(column_values(dtype, n, image_bytes())), type=dtype))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), buf)
    return buf.getvalue()


def valid_parquet() -> bytes:
    """The test split of the valid bundle, as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet_split(Path(tmp) / "test", "test", example_rows("test", 40))
        return (Path(tmp) / "test" / "test.parquet").read_bytes()


VALID_PARQUET = valid_parquet()


# ---------------------------------------------------------------------------- the properties
@fuzz(80)
@given(task_yaml())
def test_any_task_yaml_is_accepted_or_refused(text: bytes) -> None:
    bundle({"task.yaml": text})(opens_or_refuses)


@fuzz(40)
@given(st.lists(metadata_line(), max_size=5), st.lists(image_bytes(), min_size=3, max_size=3))
def test_any_imagefolder_rows_and_images_are_accepted_or_refused(lines: list[bytes], images: list[bytes]) -> None:
    files = {f"train/images/{i}.png": data for i, data in enumerate(images)}
    bundle({**files, "train/metadata.jsonl": b"\n".join(lines)})(opens_or_refuses)


@fuzz(40)
@given(parquet_split())
def test_any_parquet_split_is_accepted_or_refused(data: bytes) -> None:
    bundle({"test/test.parquet": data})(opens_or_refuses)


@fuzz(40)
@given(st.integers(0, len(VALID_PARQUET) - 1), st.sampled_from(["truncate", "change"]), st.integers(1, 255))
def test_a_truncated_or_changed_parquet_file_is_accepted_or_refused(at: int, how: str, xor: int) -> None:
    data = VALID_PARQUET[:at] if how == "truncate" else (
        VALID_PARQUET[:at] + bytes([VALID_PARQUET[at] ^ xor]) + VALID_PARQUET[at + 1:])
    bundle({"test/test.parquet": data})(opens_or_refuses)


@pytest.mark.parametrize("value, reason", [("9" * 5000, "Exceeds the limit"), ("2024-13-45", "month must be in 1..12")])
def test_a_yaml_value_python_refuses_is_a_problem_naming_task_yaml(value: str, reason: str) -> None:
    """Found by the fuzzing above: PyYAML's int and date constructors raised ValueError through the validator."""
    def check(root: Path) -> None:
        with pytest.raises(BundleError, match=f"task.yaml: invalid YAML value \\({reason}"):
            open_bundle(root)
    bundle({"task.yaml": TASK_YAML.replace("name: tiny-color", f"name: {value}").encode()})(check)


def test_a_truncated_parquet_file_is_refused_naming_it() -> None:
    def check(root: Path) -> None:
        with pytest.raises(BundleError, match="test/test.parquet"):
            open_bundle(root)
    bundle({"test/test.parquet": VALID_PARQUET[: len(VALID_PARQUET) // 2]})(check)


@fuzz(10)
@given(task_yaml(), st.lists(metadata_line(), max_size=3))
def test_data_validate_answers_any_bundle_without_a_traceback(text: bytes, lines: list[bytes]) -> None:
    def check(root: Path) -> None:
        result = CliRunner().invoke(app, ["data", "validate", str(root)])
        assert result.exit_code in (0, 1) and isinstance(result.exception, SystemExit | None), result.output
    bundle({"task.yaml": text, "train/metadata.jsonl": b"\n".join(lines)})(check)
