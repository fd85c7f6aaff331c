"""pipeline/base/files.py: the one atomic write (and the file store and fetch that use it), the
one file hash.

Durability cannot be tested by a crash: killing a process leaves its writes in the page cache,
where the next reader finds them whether or not they were fsynced, and a power cut cannot be
caused from a test. So the atomic write's tests record what `os.fsync` is called on (the path
behind each file descriptor, and whether the target already had its new name) and check the
order that makes a write survive one: the file before the rename, its directory after it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.base import files
from pipeline.base.files import TargetExists, atomic_file, atomic_write, file_sha256
from pipeline.base.store import ConflictError, FileStore, IntegrityError, ObjectInfo


class Fsyncs(list):
    """(the path an fsynced descriptor names, whether `target` existed at that moment)."""

    target: Path | None = None


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Fsyncs:
    """Every fsync pipeline.base.files makes, recorded (and still made)."""
    calls = Fsyncs()
    real = os.fsync

    def recording(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append((path, calls.target is not None and calls.target.exists()))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", recording)
    return calls


def test_the_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
    tmp_path: Path, fsyncs
) -> None:
    target = tmp_path / "sub" / "doc.json"
    fsyncs.target = target
    atomic_write(target, "new")
    assert target.read_text() == "new"
    [(file_synced, named_then), (dir_synced, named_after)] = fsyncs
    assert file_synced.parent == target.parent and file_synced.name.startswith(".doc.json.")
    assert not named_then  # the bytes were durable before they got the name
    assert dir_synced == target.parent and named_after  # and the name itself after the rename
    assert sorted(p.name for p in target.parent.iterdir()) == ["doc.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as temp:
        temp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_create_only_never_replaces_and_leaves_no_temp(tmp_path: Path, fsyncs) -> None:
    target = tmp_path / "manifest.json"
    with atomic_file(target, create_only=True) as temp:
        temp.write_text("first")
    with pytest.raises(TargetExists), atomic_file(target, create_only=True) as temp:
        temp.write_text("second")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert (tmp_path, False) in fsyncs  # the created name was made durable too


def test_the_file_store_writes_through_the_one_atomic_write(tmp_path: Path, fsyncs) -> None:
    store = FileStore(tmp_path / "store")
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 1000)
    store.put("runs/r1/manifest.json", b"{}", if_none_match=True)
    store.put("latest.json", b"{}")
    store.upload({"runs/r1/model/big.bin": (source, file_sha256(source))}, create_only=True)
    synced_dirs = {path for path, _ in fsyncs if path.is_dir()}
    assert synced_dirs == {
        tmp_path / "store",
        tmp_path / "store" / "runs" / "r1",
        tmp_path / "store" / "runs" / "r1" / "model",
    }
    with pytest.raises(ConflictError, match="already exists"):
        store.put("runs/r1/manifest.json", b"other", if_none_match=True)
    assert store.get("runs/r1/manifest.json").data == b"{}"


def test_fetch_places_objects_through_the_one_atomic_write(tmp_path: Path, fsyncs) -> None:
    store = FileStore(tmp_path / "store")
    store.put("model/a.bin", b"abc")
    expected = {"model/a.bin": ObjectInfo(3, hashlib.sha256(b"abc").hexdigest())}
    dest = tmp_path / "pulled"
    store.fetch(expected, dest)
    assert (dest / "model" / "a.bin").read_bytes() == b"abc"
    assert dest / "model" in {path for path, _ in fsyncs}

    wrong = {"model/a.bin": ObjectInfo(3, "0" * 64)}
    with pytest.raises(IntegrityError):
        store.fetch(wrong, tmp_path / "other")
    assert [p for p in (tmp_path / "other").rglob("*") if p.is_file()] == []


def test_file_sha256_hashes_a_path_or_an_open_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(100_000))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == digest
    with path.open("rb") as opened:
        assert file_sha256(opened) == digest
