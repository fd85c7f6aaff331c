"""pipeline/base/store/file.py: the file:// store on a real directory."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.base.store import (
    ConflictError,
    FileStore,
    StoreError,
)


def test_file_store_writes_are_atomic_for_readers(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    versions = [bytes([ord("a") + i]) * 2_000_000 for i in range(8)]
    store.put("latest.json", versions[0])
    seen: list[bytes] = []
    torn: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            data = store.get("latest.json").data
            seen.append(data[:1])
            if data not in versions:
                torn.append(len(data))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(40):
            store.put("latest.json", versions[round_ % len(versions)])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not torn, f"readers saw partial files of sizes {torn[:5]}"
    assert len(set(seen)) > 1  # the readers really overlapped with several writes
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["latest.json"]


def test_file_store_create_only_is_atomic_under_contention(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.ensure_writable()
    winners: list[int] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            store.put("manifest.json", json.dumps({"writer": i}).encode(), if_none_match=True)
            winners.append(i)
        except ConflictError:
            pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert json.loads(store.get("manifest.json").data) == {"writer": winners[0]}


def test_unwritable_file_store_is_a_clear_error(tmp_path: Path) -> None:
    # A regular file where a directory should be: unwritable even for root.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = FileStore(blocker / "store")
    with pytest.raises(StoreError, match="cannot create directory") as info:
        store.ensure_writable()
    assert str(blocker / "store") in str(info.value)
    with pytest.raises(StoreError, match="cannot write"):
        store.put("latest.json", b"{}")
    source = FileStore(tmp_path / "source")
    source.put("a.txt", b"a")
    with pytest.raises(StoreError, match=f"cannot write into {blocker / 'pulled'}"):
        source.fetch({"a.txt": None}, blocker / "pulled")


def test_file_store_under_a_hidden_directory(tmp_path: Path) -> None:
    store = FileStore(tmp_path / ".cache" / "store")
    store.put("runs/r1/manifest.json", b"{}")
    assert store.list_keys() == ["runs/r1/manifest.json"]
    assert store.list_dirs("runs") == ["r1"]
