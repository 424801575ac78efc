"""Atomic writes: the old file or folder, or the complete new one, and no temporary left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmoe.files import atomic_dir, write_text_atomic


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_atomic_dir_replaces_a_folder_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    with atomic_dir(out) as tmp:
        (tmp / "new").write_text("1")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert _hidden(tmp_path) == []


def test_a_failed_atomic_dir_leaves_the_old_folder_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_dir(out) as tmp:
        (tmp / "half").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["kept"]
    assert _hidden(tmp_path) == []


def test_write_text_atomic_replaces_the_file_and_creates_parents(tmp_path: Path) -> None:
    file = tmp_path / "a" / "done.json"
    write_text_atomic(file, "first")
    write_text_atomic(file, "second")
    assert file.read_text() == "second"
    assert _hidden(file.parent) == []


def test_a_failed_write_text_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "taken", "text")
    assert _hidden(tmp_path) == []
