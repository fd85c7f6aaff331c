"""One way each: the atomic write, the file hash, path -> URI and the file names.

Durability cannot be tested by a crash: killing a process leaves its writes in the page cache,
where the next reader finds them whether or not they were fsynced, and a power cut cannot be
caused from a test. So the atomic write's tests record what `os.fsync` is called on (the path
behind each file descriptor, and whether the target already had its new name) and check the
order that makes a write survive one: the file before the rename, its directory after it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from pathlib import Path

import pytest

from pipeline.base import files
from pipeline.base.files import TargetExists, atomic_file, atomic_write, file_sha256
from pipeline.base.store import ConflictError, FileStore, IntegrityError, ObjectInfo
from pipeline.base.uris import local_path, to_uri

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "tasks")


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


def test_to_uri_is_the_inverse_of_local_path_and_follows_links_only_when_asked(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real dir"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert to_uri(link) == real.resolve().as_uri()
    assert to_uri(link, follow_links=False) == link.absolute().as_uri()
    assert local_path(to_uri(real)) == real.resolve()
    assert FileStore(link).uri == link.absolute().as_uri()  # a store is named as it was given


# --- the code itself ------------------------------------------------------------------------

# A file name: a plain name with one of the extensions the pipeline writes.
FILE_NAME = re.compile(r"[\w.-]*\w\.(json|jsonl|md|png|params|optimizer|lock|partial|part)")
# Literal names that are not a run's, a store's, a work dir's or a cache's file (with why).
NOT_LAYOUT = {
    ("pipeline/prefect_server.py", "pipeline-server.json"),  # Prefect's home, not ours
    ("tasks/publish/step.py", "latest.json"),  # the start of a log line, not a path
}


def _sources() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }


def _literals(source: str) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_file_names_are_written_only_in_layout() -> None:
    strays = sorted(
        f"{name}: {literal!r}"
        for name, source in _sources().items()
        if name != "pipeline/base/layout.py"
        for literal in _literals(source)
        if FILE_NAME.fullmatch(literal) and (name, literal) not in NOT_LAYOUT
    )
    assert strays == []


def test_the_checks_find_what_they_look_for() -> None:
    layout_names = _literals((ROOT / "pipeline/base/layout.py").read_text())
    assert {"metrics.json", "dataset.json", "comparison.png"} <= {
        literal for literal in layout_names if FILE_NAME.fullmatch(literal)
    }


# Calls that belong to one module each: what is called -> the module that may call it.
ONE_WAY = {
    "os.fsync": "pipeline/base/files.py",
    "os.replace": "pipeline/base/files.py",
    "os.rename": "pipeline/base/files.py",
    "tempfile.mkstemp": "pipeline/base/files.py",
    "hashlib.file_digest": "pipeline/base/files.py",
    "as_uri": "pipeline/base/uris.py",  # Path.as_uri(), on whatever path
}
KNOWN_LEFTOVERS: set[tuple[str, str]] = set()


def _called(source: str) -> set[str]:
    """`module.function` and `.method` names of every call in `source`."""
    called = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called.add(node.func.attr)
            if isinstance(node.func.value, ast.Name):
                called.add(f"{node.func.value.id}.{node.func.attr}")
    return called


def test_atomic_writes_hashes_and_uris_are_made_in_one_place() -> None:
    elsewhere = sorted(
        f"{name} calls {call}"
        for name, source in _sources().items()
        for call in _called(source) & set(ONE_WAY)
        if name != ONE_WAY[call] and (name, call) not in KNOWN_LEFTOVERS
    )
    assert elsewhere == []


def _module_constants(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def test_metrics_file_and_exit_codes_are_defined_once() -> None:
    defined = {
        constant: sorted(
            name for name, source in _sources().items() if constant in _module_constants(source)
        )
        for constant in ("METRICS_FILE", "EXIT_USAGE", "EXIT_FAILED")
    }
    assert defined == {
        "METRICS_FILE": ["pipeline/base/layout.py"],
        "EXIT_USAGE": ["pipeline/commands.py"],
        "EXIT_FAILED": ["pipeline/commands.py"],
    }
