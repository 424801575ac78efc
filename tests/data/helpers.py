"""Builders for tiny test bundles and a tree snapshot, shared by the data-layer tests."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
TASK_YAML = "name: tiny-color\ndescription: Name the colour.\nformat_version: 1\nmetric: exact_match\n"


def png_bytes(rgb: tuple[int, int, int]) -> bytes:
    """An 8x8 PNG of one colour: the smallest image that still exercises decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def example_rows(split: str, n: int) -> list[dict]:
    """Rows with every optional-field case: explicit answers, explicit id, and neither (last row)."""
    rows = []
    for i in range(n):
        color = sorted(COLORS)[i % len(COLORS)]
        row = {"image": png_bytes(COLORS[color]), "question": "what colour is it?", "answer": color}
        if i == 0:
            row["answers"] = [color, f"{color}ish"]
        if i < n - 1:
            row["id"] = f"{split}-q{i}"
        rows.append(row)
    return rows


def write_imagefolder_split(folder: Path, rows: list[dict]) -> None:
    (folder / "images").mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, row in enumerate(rows):
            (folder / "images" / f"{i}.png").write_bytes(row["image"])
            meta = {"file_name": f"images/{i}.png", **{k: v for k, v in row.items() if k != "image"}}
            f.write(json.dumps(meta) + "\n")


def write_parquet_split(folder: Path, split: str, rows: list[dict], *, raw_bytes: bool = False) -> None:
    # Default: image as struct<bytes, path>, the way `datasets` writes an Image column.
    images = [r["image"] if raw_bytes else {"bytes": r["image"], "path": None} for r in rows]
    table = pa.table(
        {
            "image": images,
            "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "answers": [r.get("answers") for r in rows],
            "id": [r.get("id") for r in rows],
        }
    )
    folder.mkdir(parents=True)
    pq.write_table(table, folder / f"{split}.parquet")


def snapshot(root: Path) -> dict[str, tuple[bytes, float]]:
    """Every entry under root with its bytes (or link target) and mtime: to prove nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b""
            out[str(p.relative_to(root))] = (data, st.st_mtime_ns)
    return out


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixels: a bomb that costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
