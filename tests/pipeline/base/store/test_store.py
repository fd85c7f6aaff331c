"""pipeline/base/store/__init__.py: open_store and materialize."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.base.layout import MANIFEST
from pipeline.base.store import (
    FileStore,
    IntegrityError,
    StoreError,
    materialize,
    open_store,
)
from pipeline.base.store.s3 import S3Store
from tests.support.documents import manifest_bytes


def test_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig()
    relative = open_store("file://artifacts", **config.store_options())
    assert relative.uri == (tmp_path / "artifacts").as_uri()
    absolute = open_store((tmp_path / "x y").as_uri(), **config.store_options())
    assert absolute.local_root() == tmp_path / "x y"
    assert absolute.child("runs/r1").uri == (tmp_path / "x y" / "runs" / "r1").as_uri()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/dir", "unsupported scheme 'ftp'"),
        ("artifacts", "unsupported scheme ''"),
        ("s3:///prefix", "names no bucket"),
    ],
)
def test_unusable_store_uri(uri: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as info:
        open_store(uri, **PipelineConfig().store_options())
    assert uri in str(info.value)


def _stage_run(store, tmp_path: Path) -> dict[str, bytes]:
    contents = {"model/model.params": os.urandom(5000), "report/report.md": b"# report\n"}
    local = tmp_path / "staging"
    files = {}
    for key, data in contents.items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)
        files[key] = (local / key, hashlib.sha256(data).hexdigest())
    store.ensure_writable()
    store.upload(files)
    return contents


def test_materialize(store_config: PipelineConfig, tmp_path: Path) -> None:
    run = open_store(store_config.artifact_store, **store_config.store_options()).child("runs/r1")
    contents = _stage_run(run, tmp_path)
    dest = tmp_path / "dest"
    local = materialize(run.uri, dest, store_config.s3_endpoint_url)
    if isinstance(run, FileStore):
        assert local == run.root  # already local: used in place, nothing copied
        assert not dest.exists()
    else:
        assert local == dest  # no manifest: every object under the run, as stored
    assert {key: (local / key).read_bytes() for key in contents} == contents

    # With a manifest, a download (or a local run used in place) is verified against it.
    objects = {
        key: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for key, data in contents.items()
    }
    objects["report/report.md"]["sha256"] = "0" * 64
    run.put(MANIFEST, manifest_bytes("r1", objects))
    with pytest.raises(IntegrityError, match="report/report.md"):
        materialize(run.uri, tmp_path / "dest2", store_config.s3_endpoint_url)
    if isinstance(run, S3Store):
        assert not (tmp_path / "dest2" / "report" / "report.md").exists()
        assert [p.name for p in (tmp_path / "dest2" / "report").iterdir()] == []


def test_materialize_plain_path_and_missing_run(tmp_path: Path) -> None:
    config = PipelineConfig()
    (tmp_path / "run").mkdir()
    assert (
        materialize(str(tmp_path / "run"), tmp_path / "x", config.s3_endpoint_url)
        == tmp_path / "run"
    )
    with pytest.raises(StoreError, match="does not exist"):
        materialize((tmp_path / "nope").as_uri(), tmp_path / "x", config.s3_endpoint_url)
