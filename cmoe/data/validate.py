"""Validate a task bundle: report every problem as `path:line: message`, never modify the bundle.

Everything is opened read-only and nothing is written; images are header-checked for size before
they are decoded, so a decompression bomb is refused without being expanded.

`open_bundle` is the data layer's one entry for the stages: it validates a bundle once, hashes it
once, and hands out a `ValidatedBundle` (where it is, its spec, its hashes) that every later step
takes instead of a URI, so nothing re-validates or re-hashes it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import reprlib
import stat
import string
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from cmoe.data import storage
from cmoe.data.bundle import (
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    MAX_TEXT_CHARS,
    METADATA_FILE,
    METRICS,
    NAME_PATTERN,
    NAME_RE,
    SPLITS,
    TASK_FILE,
    BundleError,
    Problem,
    TaskSpec,
    bundle_entries,
    digest_entries,
    parquet_file,
    scan_tree,
    split_sha256,
)

_TASK_REQUIRED = ("name", "description", "format_version", "metric")
_TASK_FIELDS = (*_TASK_REQUIRED, "instruction")
_ROW_TEXT_FIELDS = ("question", "answer", "answers", "id")  # shared by both layouts
_ROW_REQUIRED = ("question", "answer")
_PARQUET_BATCH = 256
# PIL modes of more than 8 bits per channel (16-bit grayscale PNG/TIFF, 32-bit int, float).
WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass
class ValidationReport:
    """What validation found: the spec, per-split layout and size, the hash, and every problem."""

    uri: str
    root: Path | None = None  # the local folder checked (for s3:// URIs: the cached download; None once refused)
    spec: TaskSpec | None = None
    layouts: dict[str, str] = field(default_factory=dict)  # split -> "imagefolder" | "parquet"
    counts: dict[str, int] = field(default_factory=dict)  # split -> rows
    sha256: str | None = None  # only set when the bundle is valid
    split_sha256: dict[str, str] = field(default_factory=dict)  # split -> content hash (valid bundles only)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_if_invalid(self) -> None:
        """Raise BundleError carrying every problem, so callers never load a bad bundle."""
        if self.problems:
            raise BundleError(self.uri, self.problems)


def validate(uri: str | Path, *, cache_dir: Path | None = None) -> ValidationReport:
    """Validate a local folder or an `s3://` bundle (downloaded into `cache_dir` first). A refused
    S3 bundle's download is deleted again: nothing of a bundle cmoe will not learn stays on disk."""
    try:
        root = storage.fetch_bundle(str(uri), cache_dir=cache_dir)
    except BundleError as err:  # e.g. an S3 bundle without task.yaml: nothing was downloaded
        return ValidationReport(uri=str(uri), problems=err.problems)
    report = validate_bundle(root, uri=str(uri))
    if not report.ok and storage.is_s3(uri) and storage.forget_download(root, cache_dir=cache_dir):
        report.root = None  # no local copy any more
    return report


def validate_bundle(root: Path, *, uri: str | None = None) -> ValidationReport:
    """Validate a local bundle folder and return a report (it never raises for a bad bundle)."""
    report = ValidationReport(uri=uri or str(root), root=root)
    if not root.is_dir():
        report.problems.append(Problem(".", f"bundle folder not found: {root}"))
        return report
    try:
        _, others = scan_tree(root)
    except OSError as err:
        report.problems.append(Problem(".", f"cannot list the bundle ({err})"))
        return report
    report.problems += [_irregular_problem(root, rel) for rel in others]
    report.spec = _check_task_file(root, report.problems)
    for split in SPLITS:
        _check_split(root, split, report)
    if report.ok:
        entries = bundle_entries(root)  # every file hashed once: the bundle and split hashes share it
        report.sha256 = digest_entries(entries)
        report.split_sha256 = {split: split_sha256(entries, split) for split in SPLITS}
    return report


@dataclass(frozen=True)
class ValidatedBundle:
    """A bundle that passed validation, available as a local folder: what the stages take.

    JSON-serialisable (`to_dict` / `from_dict`), so a launcher can hand it to other processes
    without them validating again.
    """

    uri: str  # where it was read from (a local folder or s3://...)
    root: str  # the local folder holding it (for S3: the download under the cache)
    spec: TaskSpec
    sha256: str  # the whole bundle's content hash: its identity
    split_sha256: dict[str, str]  # split -> content hash of that split alone (the rehearsal guard's key)
    layouts: dict[str, str]  # split -> "imagefolder" | "parquet"
    counts: dict[str, int]  # split -> rows

    @property
    def name(self) -> str:
        """The task's name (task.yaml `name`)."""
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only."""
        return {**{f: getattr(self, f) for f in ("uri", "root", "sha256", "split_sha256", "layouts", "counts")},
                "spec": asdict(self.spec)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidatedBundle:
        """Inverse of `to_dict`."""
        return cls(**{**data, "spec": TaskSpec(**data["spec"])})


def open_bundle(uri: str | Path, *, cache_dir: Path | None = None) -> ValidatedBundle:
    """Validate a bundle once (downloading an S3 one into `cache_dir`) and return its handle; raises
    BundleError listing every problem when it is invalid."""
    report = validate(uri, cache_dir=cache_dir)
    report.raise_if_invalid()
    assert report.root is not None and report.spec is not None and report.sha256 is not None
    return ValidatedBundle(str(uri), str(report.root), report.spec, report.sha256, dict(report.split_sha256),
                           dict(report.layouts), dict(report.counts))


MAX_TASK_YAML_BYTES = 64 * 1024  # task.yaml holds a few short fields: more is not a task spec


class _TaskYamlLoader(yaml.SafeLoader):
    """SafeLoader for task.yaml: no aliases (a few hundred bytes of them expand to gigabytes, an
    "alias bomb"), and no key given twice (YAML would silently keep the last value)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's own signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in task.yaml",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's own signature
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is None:
                    continue  # a non-scalar key: PyYAML's own check reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_short(key)} is given twice (first on line {seen[key]})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value for a message, bounded in the work done and in length."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_task_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    loader = _TaskYamlLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def parse_task_yaml(text: str) -> tuple[TaskSpec | None, list[Problem]]:
    """Parse and check `task.yaml` text; problems carry the line of the offending key."""
    if len(text) > MAX_TASK_YAML_BYTES:
        return None, [Problem(TASK_FILE, f"is {len(text)} characters, over the {MAX_TASK_YAML_BYTES} limit")]
    try:
        node, data = _load_task_yaml(text)
    except RecursionError:
        return None, [Problem(TASK_FILE, "invalid YAML (nested too deeply)")]
    except ValueError as err:  # a value PyYAML matched but Python refuses: a 5 000-digit int, the date 2024-13-45
        return None, [Problem(TASK_FILE, f"invalid YAML value ({_clip(str(err))})")]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        reason = getattr(err, "problem", None) or err
        return None, [Problem(TASK_FILE, f"invalid YAML ({_clip(str(reason))})", mark.line + 1 if mark else None)]
    if not isinstance(data, dict):
        return None, [Problem(TASK_FILE, "must be a mapping of fields (name, description, ...)")]
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    problems: list[Problem] = []

    def bad(key: str, message: str) -> None:
        problems.append(Problem(TASK_FILE, message, lines.get(key)))

    for key in data:
        if key not in _TASK_FIELDS:
            bad(key, f"unknown field {_short(key)} (allowed: {', '.join(_TASK_FIELDS)})")
    for key in _TASK_REQUIRED:
        if key not in data:
            problems.append(Problem(TASK_FILE, f"required field {key!r} is missing"))
    name, description = data.get("name"), data.get("description")
    version, metric = data.get("format_version"), data.get("metric")
    instruction = data.get("instruction")
    # fullmatch: `$` alone would let a trailing newline through ("sq\n").
    if "name" in data and not (isinstance(name, str) and NAME_RE.fullmatch(name)):
        bad("name", f"name {_short(name)} must match {NAME_PATTERN} (lowercase letters, digits, dashes; at most 64)")
    if "description" in data and not (isinstance(description, str) and description.strip()):
        bad("description", "description must be a non-empty string")
    # bool is an int subclass: `format_version: true` must not pass as 1.
    if "format_version" in data and (type(version) is not int or version != FORMAT_VERSION):
        bad("format_version",
            f"format_version {_short(version)} is not supported (this cmoe reads {FORMAT_VERSION})")
    if "metric" in data and metric not in METRICS:
        bad("metric", f"metric {_short(metric)} is unknown (one of: {', '.join(METRICS)})")
    if instruction is not None and (message := _instruction_problem(instruction)):
        bad("instruction", message)
    if problems:
        return None, problems
    return TaskSpec(name, description, version, metric, instruction), []


def _clip(text: str, limit: int = 200) -> str:
    """A library's message on one line, bounded."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _instruction_problem(instruction: Any) -> str | None:
    # The template is filled with str.format(question=...): only plain `{question}` fields are
    # allowed. A format spec or conversion (`{question:d}`, `{question!x}`, `{question:>99999999999}`)
    # would fail, or allocate gigabytes, only once training has started.
    if not isinstance(instruction, str):
        return "instruction must be a string"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(instruction) if f is not None]
    except ValueError as err:
        return f"instruction is not a valid template ({err})"
    names = sorted({f for f, _, _ in fields})
    if names != ["question"]:
        return f"instruction must contain '{{question}}' and no other field (found {_short(names)})"
    if any(spec or conv for _, spec, conv in fields):
        return "instruction may only use plain '{question}' (no format spec such as ':d' or conversion such as '!r')"
    return None


def _check_task_file(root: Path, problems: list[Problem]) -> TaskSpec | None:
    path = root / TASK_FILE
    if not path.exists() and not path.is_symlink():
        problems.append(Problem(TASK_FILE, "missing: the bundle is incomplete (task.yaml is written last)"))
        return None
    if not _is_regular(path):
        return None  # a link or special file, already reported by the tree scan
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        problems.append(Problem(TASK_FILE, f"cannot read ({err})"))
        return None
    spec, found = parse_task_yaml(text)
    problems += found
    return spec


def _irregular_problem(root: Path, rel: str) -> Problem:
    path = root / rel
    if not path.is_symlink():
        return Problem(rel, "not a regular file (special files are not allowed)")
    top = rel.split("/", 1)[0]
    area, area_name = (root / top, "split folder") if top in SPLITS else (root, "bundle")
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(os.path.realpath(area)):
        return Problem(rel, f"symlink whose target resolves outside the {area_name} ({target})")
    return Problem(rel, "symlink: bundles hold regular files only (links are never followed)")


def _is_regular(path: Path) -> bool:
    # lstat: a symlink is not a regular file, whatever it points at.
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _check_split(root: Path, split: str, report: ValidationReport) -> None:
    folder, problems = root / split, report.problems
    missing = Problem(split, f"split is missing (expected {split}/{METADATA_FILE} or {parquet_file(split)})")
    if not _is_real_dir(folder):
        if not folder.is_symlink():  # a linked split folder is already reported by the tree scan
            problems.append(missing)
        return
    meta, parquet = folder / METADATA_FILE, root / parquet_file(split)
    has_meta, has_parquet = _is_regular(meta), _is_regular(parquet)
    if has_meta and has_parquet:
        problems.append(Problem(split, f"holds both {METADATA_FILE} and {parquet.name}: use one layout"))
        return
    if has_meta:
        report.layouts[split] = "imagefolder"
        rows = _imagefolder_rows(root, split, problems)
    elif has_parquet:
        report.layouts[split] = "parquet"
        rows = _parquet_rows(root, split, problems)
    else:
        problems.append(missing)
        return
    seen: dict[str, int] = {}  # id -> line of first use
    count = 0
    for count, (rel, line, record) in enumerate(rows, start=1):
        if record is None:  # malformed line, already reported
            continue
        problems += [Problem(rel, m, line) for m in _text_field_problems(record)]
        # Rows without an id get f"{split}-{index}" at load time, so defaults count as ids too.
        row_id = record.get("id") if isinstance(record.get("id"), str) else f"{split}-{count - 1}"
        if row_id in seen:
            problems.append(Problem(rel, f"duplicate id {row_id!r} (first at {rel}:{seen[row_id]})", line))
        seen.setdefault(row_id, line)
    if count == 0:
        problems.append(Problem(split, "split is empty"))
    report.counts[split] = count


def _text_field_problems(record: dict[str, Any]) -> Iterator[str]:
    for key in _ROW_REQUIRED:
        if key not in record:
            yield f"field {key!r} is missing"
    for key in ("question", "answer", "id"):
        if key in record and not (isinstance(record[key], str) and record[key].strip()):
            yield f"field {key!r} must be a non-empty string, got {_describe(record[key])}"
        elif key in record and len(record[key]) > MAX_TEXT_CHARS:
            yield f"field {key!r} is {len(record[key])} characters, over the {MAX_TEXT_CHARS} limit"
    answers = record.get("answers")
    if "answers" in record and not (
        isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)
    ):
        yield f"field 'answers' must be a non-empty list of non-empty strings, got {_describe(answers)}"


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {_short(value, 70)}"


def _imagefolder_rows(root: Path, split: str, problems: list[Problem]) -> Iterator[tuple[str, int, dict | None]]:
    """Yield (path, line, record) per line, record None when malformed; report lines and images."""
    rel = f"{split}/{METADATA_FILE}"
    folder = root / split
    checked: set[str] = set()  # images shared by several rows are decoded once
    allowed = ("file_name", *_ROW_TEXT_FIELDS)
    with open(root / rel, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(Problem(rel, "not valid UTF-8", line))
                yield rel, line, None
                continue
            except json.JSONDecodeError as err:
                problems.append(Problem(rel, f"invalid JSON: {err.msg} (column {err.colno})", line))
                yield rel, line, None
                continue
            except RecursionError:
                problems.append(Problem(rel, "invalid row: JSON nested too deeply", line))
                yield rel, line, None
                continue
            if not isinstance(record, dict):
                problems.append(Problem(rel, f"must be a JSON object, got {type(record).__name__}", line))
                yield rel, line, None
                continue
            for key in record:
                if key not in allowed:
                    problems.append(Problem(rel, f"unknown field {_short(key)} (allowed: {', '.join(allowed)})", line))
            if "file_name" not in record:
                problems.append(Problem(rel, "field 'file_name' is missing", line))
            elif message := _file_name_problem(folder, record["file_name"]):
                problems.append(Problem(rel, message, line))
            else:
                image_rel = f"{split}/{posixpath.normpath(record['file_name'])}"
                if image_rel not in checked:
                    checked.add(image_rel)
                    if message := _image_problem(root / image_rel):
                        problems.append(Problem(image_rel, message))
            yield rel, line, record


def _file_name_problem(folder: Path, file_name: Any) -> str | None:
    """Why `file_name` cannot be read safely from inside `folder`, or None when it can."""
    if not isinstance(file_name, str) or not file_name:
        return f"field 'file_name' must be a non-empty string, got {_describe(file_name)}"
    if "\\" in file_name:
        return f"file_name {file_name!r} must use '/' as separator"
    if posixpath.isabs(file_name):
        return f"file_name {file_name!r} is absolute: it must be relative to the split folder"
    norm = posixpath.normpath(file_name)
    if norm == ".." or norm.startswith("../"):
        return f"file_name {file_name!r} escapes the split folder"
    if posixpath.splitext(norm)[1].lower() not in IMAGE_EXTENSIONS:
        return f"file_name {file_name!r} has no image extension ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    path = folder / norm
    if not path.exists() and not path.is_symlink():
        return f"image {file_name!r} not found"
    if os.path.realpath(path) != os.path.join(os.path.realpath(folder), norm):
        return f"file_name {file_name!r} goes through a symlink (links are never followed)"
    if not _is_regular(path):
        return f"file_name {file_name!r} is not a regular file"
    return None


def _image_problem(source: Path | bytes) -> str | None:
    """Why an image cannot be used, or None: header size checked first, then a full decode."""
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that: treat both as bombs.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(fp, formats=IMAGE_FORMATS) as im:  # reads the header only
                width, height = im.size
                if width * height > MAX_PIXELS:
                    return f"image is {width}x{height} px, over the {MAX_PIXELS} px limit (possible decompression bomb)"
                if im.mode in WIDE_MODES:
                    # PIL's convert("RGB") clips 16-bit and float values: most pixels would come out white.
                    return (f"image has more than 8 bits per channel (mode {im.mode}): save it as 8-bit "
                            "(RGB or grayscale); it would be clipped to white")
                im.load()  # full decode: catches truncated and corrupt pixel data
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"possible decompression bomb ({err})"
    except Image.UnidentifiedImageError:  # EPS/PS (Ghostscript), SVG, a text file, ...: never handed to a decoder
        return f"cannot decode image: not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
    except Exception as err:  # noqa: BLE001 - PIL raises many exception types on corrupt input
        return f"cannot decode image ({type(err).__name__}: {err})"
    return None


class ImageInputError(ValueError):
    """An image given to `cmoe predict` or the served pyfunc (any reader outside a bundle) that cannot be used safely."""


def read_checked_image(path: str | Path) -> bytes:
    """The bytes of an image file, checked with the validator's limits before any decoder sees them:
    a regular file (a FIFO or device is refused without blocking on it), at most MAX_IMAGE_BYTES,
    a supported raster format (never EPS/PS), at most MAX_PIXELS by its header, 8 bits per channel,
    and fully decodable. Raises ImageInputError with the reason."""
    try:
        # O_NONBLOCK: opening a FIFO that has no writer must not hang; fstat then sees what it is.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise ImageInputError(f"{path}: cannot open ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageInputError(f"{path}: not a regular file (a FIFO, device or folder is never read)")
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageInputError(f"{path}: {st.st_size} bytes, over the {MAX_IMAGE_BYTES} byte limit")
        data = f.read(MAX_IMAGE_BYTES + 1)
    if message := image_bytes_problem(data):
        raise ImageInputError(f"{path}: {message}")
    return data


def image_bytes_problem(data: bytes) -> str | None:
    """Why an encoded image file's bytes (a served request's image) cannot be used, or None: the
    checks of `read_checked_image` after the file is read (bytes, format, pixels, depth, decoding)."""
    if len(data) > MAX_IMAGE_BYTES:
        return f"over the {MAX_IMAGE_BYTES} byte limit"
    return _image_problem(data)


def question_problem(question: str) -> str | None:
    """Why a question cannot be asked (empty, or over MAX_TEXT_CHARS), or None; the same limit as a bundle row's."""
    if not question.strip():
        return "the question is empty"
    if len(question) > MAX_TEXT_CHARS:
        return f"the question is {len(question)} characters, over the {MAX_TEXT_CHARS} limit"
    return None


def _parquet_rows(root: Path, split: str, problems: list[Problem]) -> Iterator[tuple[str, int, dict | None]]:
    """Yield (path, row, record) per Parquet row (1-based); report schema and image problems."""
    rel = parquet_file(split)
    try:
        pf = pq.ParquetFile(root / rel)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... on bad files
        _raise_if_io(err)
        problems.append(Problem(rel, f"cannot read Parquet ({_clip(str(err))})"))
        yield rel, 0, None  # the split is unreadable, not empty
        return
    schema_problems = list(_parquet_schema_problems(pf.schema_arrow))
    problems += [Problem(rel, m) for m in schema_problems]
    if schema_problems:
        yield rel, 0, None  # rows exist but cannot be read as rows: not "empty"
        return
    row = 0
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
    while True:
        try:
            batch = next(batches, None)
            records = batch.to_pylist() if batch is not None else []
        except Exception as err:  # noqa: BLE001 - a corrupt page: ArrowInvalid, OSError("Couldn't deserialize thrift")
            _raise_if_io(err)
            problems.append(Problem(rel, f"cannot read Parquet after row {row} (corrupt data: {_clip(str(err))})"))
            yield rel, row + 1, None
            return
        if batch is None:
            return
        for record in records:
            row += 1
            image = record.pop("image")
            data = image.get("bytes") if isinstance(image, dict) else image
            if data is None:
                problems.append(Problem(rel, "image has no embedded bytes (paths are not allowed)", row))
            elif message := _image_problem(data):
                problems.append(Problem(rel, f"image: {message}", row))
            # A null in an optional column means "absent"; a null in a required one is reported.
            yield rel, row, {k: v for k, v in record.items() if v is not None or k in _ROW_REQUIRED}


def _raise_if_io(err: Exception) -> None:
    """Re-raise an operating-system I/O error (errno set: EIO, ESTALE, ...): that is the disk or the
    network failing, which a retry may fix. pyarrow's own OSErrors (a corrupt file) carry no errno."""
    if isinstance(err, OSError) and err.errno is not None:
        raise err


def _parquet_schema_problems(schema: pa.Schema) -> Iterator[str]:
    def is_text(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    def is_bytes(t: pa.DataType) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    allowed = ("image", *_ROW_TEXT_FIELDS)
    if twice := sorted({name for name in schema.names if schema.names.count(name) > 1}):
        yield f"duplicate column name(s) {', '.join(map(repr, twice))}: every column must be named once"
        return
    for name in schema.names:
        if name not in allowed:
            yield f"unknown column {name!r} (allowed: {', '.join(allowed)})"
    for name in ("image", *_ROW_REQUIRED):
        if name not in schema.names:
            yield f"column {name!r} is missing"
    for name in ("question", "answer", "id"):
        if name in schema.names and not is_text(schema.field(name).type):
            yield f"column {name!r} must be string, got {schema.field(name).type}"
    if "answers" in schema.names:
        t = schema.field("answers").type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and is_text(t.value_type)):
            yield f"column 'answers' must be list<string>, got {t}"
    if "image" in schema.names:
        t = schema.field("image").type
        struct_ok = pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and is_bytes(t.field("bytes").type)
        if not (struct_ok or is_bytes(t)):
            yield f"column 'image' must be binary or struct<bytes: binary, path: string>, got {t}"
