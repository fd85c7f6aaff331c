"""pipeline/base/files.py on a real directory: atomic writes leave the old file or the whole
new one and no temp file; documents are read without following a link and within a bound."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.base.files import (
    UnsafeFileError,
    atomic_save,
    atomic_write,
    atomic_writer,
    open_no_links,
    read_document_file,
)
from pipeline.base.files import _temp_sibling as temp_sibling  # the atomic write's own helper


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_write_creates_parents_writes_text_and_bytes_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "doc.json"
    atomic_write(target, "ünïcode\n")
    assert target.read_bytes() == "ünïcode\n".encode()
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_writer(target) as sink:
        sink.write(b"half of the new")
        assert leftovers(tmp_path) != []  # the new bytes go to a hidden sibling first
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_save_lets_a_library_write_the_file(tmp_path: Path) -> None:
    target = tmp_path / "model.params"
    atomic_save(target, lambda path: Path(path).write_bytes(b"params"))
    assert target.read_bytes() == b"params"

    def half_then_fail(path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError("library failed")

    with pytest.raises(OSError, match="library failed"):
        atomic_save(target, half_then_fail)
    assert target.read_bytes() == b"params" and leftovers(tmp_path) == []


def test_temp_siblings_are_hidden_unique_and_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    first, second = temp_sibling(target), temp_sibling(target)
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(".doc.json.") and first.name.endswith(".partial")
    assert stat.S_IMODE(first.stat().st_mode) == 0o644


def test_a_document_is_read_whole_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_bytes(b"x" * 10)
    assert read_document_file(path, limit=10) == b"x" * 10
    with pytest.raises(UnsafeFileError, match="10 bytes, more than the 9"):
        read_document_file(path, limit=9)
    with pytest.raises(FileNotFoundError):
        read_document_file(tmp_path / "missing.json", limit=10)


def test_a_linked_document_is_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    (tmp_path / "run").mkdir()
    os.symlink(secret, tmp_path / "run" / "metrics.json")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        read_document_file(tmp_path / "run" / "metrics.json", limit=100)


def test_a_link_at_any_component_below_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "file").write_text("data")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "dir")
    with pytest.raises(UnsafeFileError, match="dir is a symbolic link"):
        open_no_links(tmp_path / "root", "dir/file")
    (tmp_path / "root" / "real").mkdir()
    (tmp_path / "root" / "real" / "file").write_text("data")
    with open_no_links(tmp_path / "root", "real/file") as source:
        assert source.read() == b"data"


def test_a_directory_or_a_fifo_is_not_a_document(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("dir", "fifo"):
        with pytest.raises(UnsafeFileError, match="not a regular file"):
            open_no_links(tmp_path, name)
