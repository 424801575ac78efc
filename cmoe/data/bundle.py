"""Task bundle format: constants, the task spec, problems/errors and the content hash.

A task bundle is an immutable folder (local or under an S3 prefix) holding one task; see
docs/task-format.md. This module has no I/O beyond reading local files for the hash, so every
other data module (validation, storage, loading) can share it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
TASK_FILE = "task.yaml"  # written last: its presence marks the bundle complete
METADATA_FILE = "metadata.jsonl"  # ImageFolder layout of one split
SPLITS = ("train", "test")
METRICS = ("exact_match", "contains", "vqa_soft")
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
# Header-checked before any decode: larger images are refused as possible decompression bombs.
MAX_PIXELS = 4096 * 4096
# An image file larger than this is refused unread (a 4096x4096 RGB PNG is at most ~50 MB).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# Longest question or answer a bundle row (or a `cmoe predict` question) may hold, in characters.
MAX_TEXT_CHARS = 2000
# Only well-understood raster formats: PIL's EPS/PS plugins would shell out to Ghostscript.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_HASH_CHUNK = 1 << 20
# Terminal escape sequences: CSI (colours, cursor moves), OSC (window title, hyperlinks), two-byte ESC x.
_ESCAPE_SEQ = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]|\x9b[0-?]*[ -/]*[@-~]")
# C0 and C1 control characters and DEL, but not tab.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` safe for a terminal: terminal escape sequences removed, every other control character
    (a lone ESC, CR, BEL, newlines, ...) shown as its \\xNN escape, so a bundle's text cannot rewrite
    the user's screen or hide what follows."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", _ESCAPE_SEQ.sub("", text))


def parquet_file(split: str) -> str:
    """Relative path of a split's Parquet file (`train/train.parquet`), the other native layout."""
    return f"{split}/{split}.parquet"


@dataclass(frozen=True)
class TaskSpec:
    """The parsed, validated `task.yaml` of one bundle."""

    name: str
    description: str
    format_version: int
    metric: str
    instruction: str | None = None


@dataclass(frozen=True)
class Problem:
    """One validation problem, located by a bundle-relative path and (optionally) a 1-based line."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        # One problem per output line, even when a library's error message spans several.
        return printable(f"{where}: {' '.join(self.message.splitlines())}")


class BundleError(ValueError):
    """A bundle is invalid or unreadable; `problems` lists every problem found, not just the first."""

    def __init__(self, uri: str, problems: list[Problem]) -> None:
        self.uri = uri
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid task bundle {uri} ({len(self.problems)} problem(s)):\n{lines}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file's bytes, read in chunks so large Parquet files stay cheap."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_entries(entries: dict[str, str]) -> str:
    """Bundle hash from {relative POSIX path: file sha256}: sha256 of sorted "path\\tsha\\n" lines."""
    h = hashlib.sha256()
    for rel in sorted(entries):
        h.update(f"{rel}\t{entries[rel]}\n".encode())
    return h.hexdigest()


def _raise(err: OSError) -> None:
    raise err


def scan_tree(root: Path) -> tuple[list[str], list[str]]:
    """Walk `root` without following links: (regular files, other entries), as sorted POSIX paths.

    "Other" means symlinks and special files. Links are never followed (one could point anywhere on
    the machine) and special files (FIFOs, devices) could block a reader forever.
    """
    files, others = [], []
    # onerror raises: an unreadable folder must not silently drop files from the hash.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_raise):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                files.append(path.relative_to(root).as_posix())
            elif not stat.S_ISDIR(mode):
                others.append(path.relative_to(root).as_posix())
    return sorted(files), sorted(others)


def bundle_files(root: Path) -> list[str]:
    """Every file of a bundle as sorted relative POSIX paths; raises BundleError on links/special files."""
    files, others = scan_tree(root)
    if others:
        raise BundleError(str(root), [Problem(rel, "not a regular file (symlinks are not allowed)") for rel in others])
    return files


def bundle_entries(root: Path) -> dict[str, str]:
    """{relative POSIX path: file sha256} of every file of a bundle: what its hashes are made of."""
    return {rel: file_sha256(root / rel) for rel in bundle_files(root)}


def bundle_sha256(root: Path) -> str:
    """The bundle's identity: identical for a local folder and its S3 copy (see docs/task-format.md)."""
    return digest_entries(bundle_entries(root))


def split_sha256(entries: dict[str, str], split: str) -> str:
    """Content hash of one split: its files' paths *inside the split* and hashes, so a renamed copy
    of a bundle (other task.yaml, same training data) has the same train-split hash."""
    prefix = f"{split}/"
    return digest_entries({rel[len(prefix):]: sha for rel, sha in entries.items() if rel.startswith(prefix)})
