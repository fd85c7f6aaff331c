"""pipeline/base/store/base.py: what every artifact store does, on a real directory and a
real SeaweedFS server."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.base.store import (
    ConflictError,
    FileStore,
    IntegrityError,
    ObjectInfo,
    open_store,
)


def test_conditional_writes(store_config: PipelineConfig) -> None:
    store = open_store(store_config.artifact_store, **store_config.store_options())
    store.ensure_writable()
    store.put("doc.json", b'{"v": 1}', if_none_match=True)
    with pytest.raises(ConflictError):
        store.put("doc.json", b'{"v": 2}', if_none_match=True)
    first = store.get("doc.json")
    assert first is not None and first.data == b'{"v": 1}'

    store.put("doc.json", b'{"v": 3}', if_match=first.etag)
    with pytest.raises(ConflictError):
        store.put("doc.json", b'{"v": 4}', if_match=first.etag)  # stale version tag
    with pytest.raises(ConflictError):
        store.put("absent.json", b"{}", if_match=first.etag)
    assert store.get("doc.json").data == b'{"v": 3}'
    assert store.get("absent.json") is None
    assert store.list_keys() == ["doc.json"]  # no temp or lock files visible


def test_sync_uploads_only_what_differs(store_config: PipelineConfig, tmp_path: Path) -> None:
    store = open_store(store_config.artifact_store, **store_config.store_options())
    store.ensure_writable()
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "a.bin").write_bytes(os.urandom(1000))
    (local / "sub" / "b.txt").write_text("hello")
    files = {
        key: (local / key, hashlib.sha256((local / key).read_bytes()).hexdigest())
        for key in ("a.bin", "sub/b.txt")
    }

    assert store.sync(files) == ["a.bin", "sub/b.txt"]
    assert store.sync(files) == []
    (local / "sub" / "b.txt").write_text("changed")
    files["sub/b.txt"] = (local / "sub" / "b.txt", hashlib.sha256(b"changed").hexdigest())
    assert store.sync(files) == ["sub/b.txt"]
    assert store.stat("sub/b.txt") == ObjectInfo(7, files["sub/b.txt"][1])
    assert store.rehash("sub/b.txt") == ObjectInfo(7, files["sub/b.txt"][1])
    assert store.stat("missing") is None


def test_unsafe_keys_are_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    for key in ("../escape", "/etc/passwd", ""):
        with pytest.raises(IntegrityError, match="not a plain relative path"):
            store.put(key, b"x")
    with pytest.raises(IntegrityError):
        store.fetch({"../../outside": None}, tmp_path / "dest")
    assert not (tmp_path / "outside").exists()
