"""tasks/publish/step.py under contention and faults: racing publishers, a publisher killed
or crashing mid-way, wrong credentials, an endpoint down."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.base.config import PipelineConfig
from pipeline.base.layout import LATEST, MANIFEST
from pipeline.base.store import (
    FileStore,
    StoreError,
    open_store,
)
from pipeline.base.store.documents import Manifest, document_bytes
from tasks.publish.artifacts import list_runs, pull_run, verify_run
from tasks.publish.step import promote_latest, publish_run
from tests.support.documents import manifest_bytes
from tests.support.publish import (
    T0,
    assert_incomplete_then_completed,
    make_run_dir,
    read_latest,
    start_publisher,
    with_run,
)


@pytest.mark.s3
def test_racing_publishers_of_one_run_id_in_two_processes(
    s3_env, s3_store_uri: str, record: dict, tmp_path: Path
) -> None:
    """Two real processes publish one run id with different bytes, at the same instant: at most
    one succeeds (both fail when each created some of the objects first), and latest.json only
    ever names a run that verifies."""
    for round_ in range(3):
        configs = [
            PipelineConfig(
                artifact_store=s3_store_uri,
                s3_endpoint_url=s3_env.endpoint,
                work_dir=tmp_path / f"host-{host}",
                run_id=f"race-{round_}",
            )
            for host in "ab"
        ]
        dirs = [make_run_dir(c, created=T0, accuracy=0.85 + i / 100) for i, c in enumerate(configs)]
        start_at = time.time() + 3
        processes = [
            start_publisher(c, d, record, start_at=start_at)
            for c, d in zip(configs, dirs, strict=True)
        ]
        try:
            outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        codes = [p.returncode for p in processes]
        for code, output in zip(codes, outputs, strict=True):
            assert code == 0 or "ConflictError" in output, output
        assert codes.count(0) <= 1, outputs  # different bytes: never both
        run_store = open_store(s3_store_uri, **configs[0].store_options()).child(
            f"runs/race-{round_}"
        )
        if 0 in codes:  # the winner's run verifies, and latest.json names it
            assert verify_run(configs[0], f"race-{round_}") == []
            assert read_latest(configs[0])["run_id"] == f"race-{round_}"
            pulled = pull_run(configs[0], f"race-{round_}", tmp_path / f"pulled-{round_}")
            assert pulled.is_dir()
        else:  # each won some objects: neither wrote a manifest, latest.json is unchanged
            assert run_store.stat(MANIFEST) is None
            latest = open_store(s3_store_uri, **configs[0].store_options()).get(LATEST)
            assert latest is None or json.loads(latest.data)["run_id"] != f"race-{round_}"


def test_racing_publishers_both_complete_and_latest_is_the_newer(
    store_config: PipelineConfig, record: dict
) -> None:
    store = open_store(store_config.artifact_store, **store_config.store_options())
    configs = [with_run(store_config, f"race-{i}") for i in range(2)]
    run_dirs = [make_run_dir(c, created=T0 + i) for i, c in enumerate(configs)]
    barrier = threading.Barrier(len(configs))
    errors: list[BaseException] = []

    def run(config: PipelineConfig, run_dir: Path) -> None:
        try:
            barrier.wait(timeout=30)
            publish_run(store, run_dir, record, config)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=pair) for pair in zip(configs, run_dirs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert [r["run_id"] for r in list_runs(store_config)] == ["race-1", "race-0"]
    assert read_latest(store_config)["run_id"] == "race-1"


def test_compare_and_swap_keeps_the_newest_under_contention(
    store_config: PipelineConfig,
) -> None:
    store = open_store(store_config.artifact_store, **store_config.store_options())
    store.ensure_writable()
    writers = 6
    for round_ in range(3):
        orders = random.sample(range(writers), writers)  # start order unrelated to order
        manifests = [
            Manifest.model_validate(
                {**json.loads(manifest_bytes(f"r{round_}-{order}", {})), "published_after": order}
            )
            for order in orders
        ]
        for manifest in manifests:
            manifest.published_after += 100 * round_
        barrier = threading.Barrier(writers)
        results: dict[str, bool | BaseException] = {}

        def promote(manifest: dict, barrier=barrier, results=results) -> None:
            barrier.wait(timeout=30)
            try:
                digest = hashlib.sha256(document_bytes(manifest)).hexdigest()
                results[manifest.run_id] = promote_latest(store, manifest, digest).promoted
            except BaseException as exc:  # reported by the main thread
                results[manifest.run_id] = exc

        threads = [threading.Thread(target=promote, args=(m,)) for m in manifests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        newest = f"r{round_}-{writers - 1}"
        assert results[newest] is True
        assert all(isinstance(value, bool) for value in results.values()), results
        assert read_latest(store_config)["run_id"] == newest


@pytest.mark.s3
def test_publisher_killed_mid_upload_leaves_an_invisible_run(
    s3_env, s3_store_uri: str, record: dict, tmp_path: Path
) -> None:
    config = PipelineConfig(
        artifact_store=s3_store_uri,
        s3_endpoint_url=s3_env.endpoint,
        work_dir=tmp_path,
        run_id="run-killed",
    )
    run_dir = make_run_dir(config, created=T0, large_bytes=64 * 2**20)
    part = 5 * 2**20
    # One connection, small parts and a bandwidth cap: the 64 MB upload takes seconds.
    transfer = dict(
        multipart_threshold=part,
        multipart_chunksize=part,
        max_concurrency=1,
        max_bandwidth=16 * 2**20,
    )
    bucket, prefix = s3_store_uri.removeprefix("s3://").split("/", 1)
    run_prefix = f"{prefix}/runs/run-killed/"
    s3 = s3_env.client()
    process = start_publisher(config, run_dir, record, transfer=transfer)
    try:
        deadline = time.monotonic() + 60
        while True:  # until at least one part of the multipart upload is stored
            uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=run_prefix)
            parts = [
                p
                for u in uploads.get("Uploads", [])
                for p in s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get(
                    "Parts", []
                )
            ]
            if parts:
                break
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "no multipart upload started within 60 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    run_store = open_store(s3_store_uri, **config.store_options()).child("runs/run-killed")
    assert run_store.stat(MANIFEST) is None
    assert run_store.stat("model/large.bin") is None  # a multipart upload is all or nothing
    assert_incomplete_then_completed(config, run_dir, record, set(run_store.list_keys()))


def test_publisher_crashing_mid_write_leaves_no_torn_file(record: dict, tmp_path: Path) -> None:
    config = PipelineConfig(
        artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path, run_id="run-killed"
    )
    run_dir = make_run_dir(config, created=T0, large_bytes=16 * 2**20)
    limit = 8 * 2**20  # the large file is cut off half way by the file size limit
    process = start_publisher(config, run_dir, record, max_file_bytes=limit)
    try:
        assert process.wait(timeout=120) == -signal.SIGXFSZ, process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    stored_run = tmp_path / "store" / "runs" / "run-killed"
    assert not (stored_run / MANIFEST).exists()
    assert not (stored_run / "model" / "large.bin").exists()
    [torn] = (stored_run / "model").glob(".large.bin.*.partial")  # its bytes never got a name
    assert torn.stat().st_size == limit
    run_store = FileStore(stored_run)
    assert_incomplete_then_completed(config, run_dir, record, set(run_store.list_keys()))


@pytest.mark.s3
def test_wrong_credentials_fail_before_anything_is_written(
    s3_env, s3_store_uri: str, record: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    config = PipelineConfig(
        artifact_store=s3_store_uri,
        s3_endpoint_url=s3_env.endpoint,
        work_dir=tmp_path,
        run_id="run-a",
    )
    run_dir = make_run_dir(config, created=T0)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError) as info:
        publish_run(open_store(s3_store_uri, **config.store_options()), run_dir, record, config)
    message = str(info.value)
    assert s3_env.endpoint in message and repr(s3_env.access_key) in message
    assert "not-the-secret" not in message

    flags = ["--artifact-store", s3_store_uri, "--s3-endpoint-url", s3_env.endpoint]
    assert cli.main(["artifacts", *flags, "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: S3 endpoint")
    assert "not-the-secret" not in err and "Traceback" not in err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert open_store(s3_store_uri, **config.store_options()).list_keys() == []


@pytest.mark.s3
def test_endpoint_down_fails_clearly_and_publishes_nothing(
    s3_env, s3_store_uri: str, dead_endpoint: str, record: dict, tmp_path: Path
) -> None:
    live = PipelineConfig(
        artifact_store=s3_store_uri,
        s3_endpoint_url=s3_env.endpoint,
        work_dir=tmp_path,
        run_id="run-a",
    )
    down = live.model_copy(update={"s3_endpoint_url": dead_endpoint})
    run_dir = make_run_dir(live, created=T0)
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach S3 endpoint {dead_endpoint}"):
        publish_run(open_store(s3_store_uri, **down.store_options()), run_dir, record, down)
    assert time.monotonic() - start < 60
    with pytest.raises(StoreError, match="gave up after 3 attempts"):
        list_runs(down)
    assert list_runs(live) == []
