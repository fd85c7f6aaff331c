"""pipeline/base/store/s3.py against a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from boto3.s3.transfer import TransferConfig

from pipeline.base.config import PipelineConfig
from pipeline.base.store import (
    ObjectInfo,
    StoreError,
    open_store,
)
from pipeline.base.store.s3 import S3Store


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
