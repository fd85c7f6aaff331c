"""The artifact stores against a real directory and a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from pipeline.base.config import PipelineConfig
from pipeline.base.layout import MANIFEST
from pipeline.base.store import (
    ConflictError,
    FileStore,
    IntegrityError,
    ObjectInfo,
    StoreError,
    materialize,
    open_store,
)
from pipeline.base.store.s3 import S3Store
from tests.support.documents import manifest_bytes


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


@pytest.mark.s3
def test_s3_objects_carry_server_checked_and_whole_file_sha256(s3_env, s3_store_uri, tmp_path):
    config = PipelineConfig(artifact_store=s3_store_uri, s3_endpoint_url=s3_env.endpoint)
    chunk = 5 * 2**20  # S3's smallest part size, so that the big file goes up in 3 parts
    transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk)
    store = open_store(config.artifact_store, **config.store_options(), transfer=transfer)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * chunk + 123))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    store.upload({"big.bin": (big, digest)})

    assert isinstance(store, S3Store)
    head = s3_env.client().head_object(
        Bucket=store.bucket, Key=f"{store.prefix}/big.bin", ChecksumMode="ENABLED"
    )
    assert head["Metadata"]["sha256"] == digest
    assert head["ChecksumSHA256"].endswith("-3")  # per-part SHA-256s, checked by the server
    assert store.rehash("big.bin") == ObjectInfo(big.stat().st_size, digest)


@pytest.mark.s3
def test_s3_objects_carry_their_content_types(s3_env, s3_store_uri, tmp_path):
    # So that an S3 console or a browser shows a report or a picture instead of downloading it.
    config = PipelineConfig(artifact_store=s3_store_uri, s3_endpoint_url=s3_env.endpoint)
    store = open_store(config.artifact_store, **config.store_options())
    expected = {
        "report/report.md": "text/markdown; charset=utf-8",
        "report/confusion_matrix.png": "image/png",
        "metrics/eval.json": "application/json",
        "model/model.params": "application/octet-stream",
    }
    files = {}
    for key in expected:
        path = tmp_path / key.replace("/", "_")
        path.write_bytes(key.encode())
        files[key] = (path, hashlib.sha256(key.encode()).hexdigest())
    store.upload(files)
    store.put("latest.json", b"{}")
    expected["latest.json"] = "application/json"
    client = s3_env.client()
    for key, content_type in expected.items():
        head = client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")
        assert head["ContentType"] == content_type, key


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


def test_unsafe_keys_are_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    for key in ("../escape", "/etc/passwd", ""):
        with pytest.raises(IntegrityError, match="not a plain relative path"):
            store.put(key, b"x")
    with pytest.raises(IntegrityError):
        store.fetch({"../../outside": None}, tmp_path / "dest")
    assert not (tmp_path / "outside").exists()


@pytest.mark.s3
def test_wrong_credentials_name_endpoint_and_key_id_not_secret(
    s3_env, s3_store_uri, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = PipelineConfig(artifact_store=s3_store_uri, s3_endpoint_url=s3_env.endpoint)
    for key_id, secret in [
        (s3_env.access_key, "wrong-secret-value"),
        ("UNKNOWNKEYID", s3_env.secret_key),
    ]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        store = open_store(config.artifact_store, **config.store_options())
        for operation, *args in [(store.ensure_writable,), (store.list_keys,), (store.get, "x")]:
            with pytest.raises(StoreError) as info:
                operation(*args)
            message = str(info.value)
            assert s3_env.endpoint in message and repr(key_id) in message
            assert secret not in message and "\n" not in message


@pytest.mark.s3
def test_endpoint_down_is_retried_then_a_clear_error(
    s3_env, dead_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = PipelineConfig(artifact_store="s3://bucket/prefix", s3_endpoint_url=dead_endpoint)
    for attempts in ("3", "2"):  # boto3's default, then its own AWS_MAX_ATTEMPTS variable
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", attempts)
        store = open_store(config.artifact_store, **config.store_options())
        start = time.monotonic()
        with pytest.raises(StoreError) as info:
            store.ensure_writable()
        assert time.monotonic() - start < 60
        assert f"cannot reach S3 endpoint {dead_endpoint}" in str(info.value)
        assert f"gave up after {attempts} attempts" in str(info.value)


@pytest.mark.s3
def test_missing_bucket_is_created_only_when_allowed(s3_env) -> None:
    bucket = f"created-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    uri = f"s3://{bucket}/models"
    refusing = PipelineConfig(artifact_store=uri, s3_endpoint_url=s3_env.endpoint)
    with pytest.raises(StoreError, match="--create-bucket") as info:
        open_store(uri, **refusing.store_options()).ensure_writable()
    assert repr(bucket) in str(info.value) and s3_env.endpoint in str(info.value)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(uri, **refusing.store_options()).list_dirs("runs")

    allowing = refusing.model_copy(update={"create_bucket": True})
    store = open_store(uri, **allowing.store_options())
    store.ensure_writable()
    store.ensure_writable()  # already there: fine
    store.put("latest.json", b"{}")
    assert s3_env.client().head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


@pytest.mark.s3
def test_endpoint_from_boto3_environment(s3_env, s3_store_uri, monkeypatch) -> None:
    # No s3_endpoint_url in our config: boto3's own AWS_ENDPOINT_URL applies (path-style).
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    store = open_store(s3_store_uri, **PipelineConfig(artifact_store=s3_store_uri).store_options())
    store.put("hello.txt", b"hi")
    assert store.get("hello.txt").data == b"hi"
    assert isinstance(store, S3Store) and store.endpoint == s3_env.endpoint


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
