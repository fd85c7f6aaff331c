"""The publish step and `pipeline artifacts`, on a real directory and a real SeaweedFS server.

Run directories here are made of real files laid out as the train and evaluate steps write
them (a params file, metrics, a report, a PNG); the dataset record is that of the real
Fashion-MNIST files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.layout import LATEST, MANIFEST
from pipeline.base.store import (
    ArtifactStore,
    ConflictError,
    FileStore,
    IntegrityError,
    StoreError,
    open_store,
)
from pipeline.base.store.documents import Manifest, document_bytes
from tasks.dataset import CLASS_NAMES, prepare_dataset, read_record
from tasks.publish.artifacts import list_runs, pull_run, show_run, verify_run
from tasks.publish.manifest import format_run_line
from tasks.publish.step import PublishError, promote_latest, publish_run
from tests.support.documents import manifest_bytes
from tests.support.steps import for_run, published

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
T0 = 1_700_000_000.0  # creation time of the first test run; later runs are newer


@pytest.fixture(scope="session")
def dataset_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    config = PipelineConfig(
        mirrors=[DEBIAN_MIRROR], data_dir=tmp_path_factory.mktemp("fashion-mnist")
    )
    return prepare_dataset(config)


@pytest.fixture
def record(dataset_uri: str) -> dict:
    return read_record(dataset_uri)


def make_run_dir(
    config: PipelineConfig,
    *,
    created: float,
    accuracy: float = 0.84,
    passed: bool = True,
    large_bytes: int = 0,
) -> Path:
    """A run directory as train + evaluate leave it, its files dated `created`."""
    rng = random.Random(config.run_id)
    run_dir = config.run_dir()
    params = rng.randbytes(4 * (784 * 10 + 10) + 64)
    epochs = [
        {"epoch": e, "loss": 0.9 / e, "train_accuracy": 0.7 + e / 100, "test_accuracy": 0.7}
        for e in range(1, 4)
    ]
    per_class = [{"class": name, "accuracy": accuracy} for name in CLASS_NAMES]
    gate = {"metric": "accuracy", "threshold": 0.8, "value": accuracy, "passed": passed}
    files = {
        "config.json": config.model_dump_json(indent=2).encode(),
        "model/model-symbol.json": json.dumps({"nodes": [{"op": "FullyConnected"}]}).encode(),
        "model/model-0000.params": params,
        "model/model.params": params,
        "metrics/train.jsonl": "".join(json.dumps(e) + "\n" for e in epochs).encode(),
        "metrics/train.json": json.dumps({"epochs": 3, "test_accuracy": accuracy}).encode(),
        "report/metrics.json": json.dumps(
            {
                "accuracy": accuracy,
                "train_accuracy": 0.86,
                "mean_loss": 0.45,
                "ece": 0.02,
                "per_class": per_class,
                "confusion_matrix": [[rng.randrange(1000) for _ in range(10)] for _ in range(10)],
                "gate": gate,
            }
        ).encode(),
        "report/report.md": f"# Run {config.run_id}\n\naccuracy {accuracy}\n".encode(),
        "checkpoints/epoch-0003.params": params,  # local only: never published
    }
    if large_bytes:
        files["model/large.bin"] = os.urandom(large_bytes)
    for key, data in files.items():
        (run_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / key).write_bytes(data)
    Image.new("L", (28, 28), color=128).save(run_dir / "report" / "confusion_matrix.png")
    for path in run_dir.rglob("*"):
        os.utime(path, (created, created))
    return run_dir


def published_keys(run_dir: Path) -> set[str]:
    return {
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and not p.relative_to(run_dir).as_posix().startswith("checkpoints/")
    }


def with_run(config: PipelineConfig, run_id: str) -> PipelineConfig:
    return config.model_copy(update={"run_id": run_id})


def read_latest(config: PipelineConfig) -> dict:
    blob = open_store(config.artifact_store, **config.store_options()).get(LATEST)
    assert blob is not None, "latest.json is missing"
    return json.loads(blob.data)


@pytest.fixture
def tamper(request: pytest.FixtureRequest):
    """Change (or, with None, delete) a stored object behind the store's back."""

    def tamper(store: ArtifactStore, key: str, data: bytes | None) -> None:
        if isinstance(store, FileStore):
            path = store.root / key
            path.unlink() if data is None else path.write_bytes(data)
            return
        s3 = request.getfixturevalue("s3_server").client()
        full_key = f"{store.prefix}/{key}"
        if data is None:
            s3.delete_object(Bucket=store.bucket, Key=full_key)
            return
        # Keep the recorded digest: only re-hashing the stored bytes can tell.
        metadata = s3.head_object(Bucket=store.bucket, Key=full_key)["Metadata"]
        s3.put_object(Bucket=store.bucket, Key=full_key, Body=data, Metadata=metadata)

    return tamper


# --- the whole path -----------------------------------------------------------------------------


def test_publish_then_list_show_pull_verify(
    store_config: PipelineConfig, dataset_uri: str, tmp_path: Path
) -> None:
    config = with_run(store_config, "run-a")
    run_dir = make_run_dir(config, created=T0)

    uri = published(config, dataset_uri, run_dir.resolve().as_uri())

    store = open_store(config.artifact_store, **config.store_options())
    assert uri == store.child("runs/run-a").uri
    manifest = show_run(config, "run-a")
    keys = published_keys(run_dir)
    assert "report/confusion_matrix.png" in keys and len(keys) == 9
    assert set(manifest["objects"]) == keys
    for key in keys:
        data = (run_dir / key).read_bytes()
        assert manifest["objects"][key] == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    assert manifest["run_id"] == "run-a"
    assert manifest["dataset"] == read_record(dataset_uri)
    given = for_run(config, dataset_uri, run_dir.resolve())  # the config the step was given
    assert manifest["config"] == given.model_dump(mode="json")
    assert manifest["metrics"] == json.loads((run_dir / "report/metrics.json").read_text())
    assert manifest["code_revision"].startswith(("git:", "fashion-pipeline=="))
    assert manifest["flow_run_id"] is None  # not inside a Prefect flow run here
    assert manifest["restarts"] == []  # the training's ranks never died
    assert datetime.fromisoformat(manifest["created_at"]) == datetime.fromtimestamp(T0, UTC)
    assert manifest["published_at"] > manifest["created_at"]

    [run] = list_runs(config)
    assert run["run_id"] == "run-a" and run["accuracy"] == 0.84
    assert run["gate_passed"] and run["latest"]
    assert "run-a  accuracy 0.8400  gate passed" in format_run_line(run)
    assert read_latest(config)["run_id"] == "run-a"

    pulled = pull_run(config, "run-a", tmp_path / "pulled")
    assert published_keys(pulled) == keys | {MANIFEST}
    for key in keys:
        assert (pulled / key).read_bytes() == (run_dir / key).read_bytes()
    assert json.loads((pulled / MANIFEST).read_text()) == manifest
    assert verify_run(config, "run-a") == []


def test_the_training_restarts_are_recorded_in_the_manifest(
    store_config: PipelineConfig, dataset_uri: str
) -> None:
    config = with_run(store_config, "run-restarted")
    run_dir = make_run_dir(config, created=T0)
    restart = {"restart": 1, "rank": 1, "reason": "exited with status 137 (SIGKILL)",
               "from_epoch": 2, "num_proc": 1}  # fmt: skip
    # A line that is not a JSON object (a torn write) is left out, not fatal.
    (run_dir / "metrics/restarts.jsonl").write_text(json.dumps(restart) + "\n[1, 2\n")
    published(config, dataset_uri, run_dir.resolve().as_uri())
    manifest = show_run(config, "run-restarted")
    assert manifest["restarts"] == [restart]
    assert "metrics/restarts.jsonl" in manifest["objects"]


def test_cli_artifacts_commands(
    store_config: PipelineConfig, record: dict, tmp_path: Path, capsys, tamper
) -> None:
    config = with_run(store_config, "run-cli")
    publish_run(
        open_store(config.artifact_store, **config.store_options()),
        make_run_dir(config, created=T0),
        record,
        config,
    )
    flags = ["--artifact-store", config.artifact_store]
    if config.s3_endpoint_url:
        flags += ["--s3-endpoint-url", config.s3_endpoint_url]

    assert cli.main(["artifacts", *flags, "list"]) == 0
    assert "run-cli  accuracy 0.8400  gate passed" in capsys.readouterr().out
    assert cli.main(["artifacts", *flags, "verify", "run-cli"]) == 0
    capsys.readouterr()

    run_store = open_store(config.artifact_store, **config.store_options()).child("runs/run-cli")
    tamper(run_store, "report/report.md", b"# Run run-cli\n\naccuracy 0.99\n")  # same size
    assert cli.main(["artifacts", *flags, "verify", "run-cli"]) == 1
    err = capsys.readouterr().err
    assert "report/report.md: SHA-256" in err and "error: run run-cli: 1 problem(s)" in err
    assert cli.main(["artifacts", *flags, "show", "no-such-run"]) == 1
    assert capsys.readouterr().err.startswith("error: run 'no-such-run' is not in")


# --- idempotence and conflicts ------------------------------------------------------------------


def test_publishing_again_uploads_nothing_and_repairs_damage(
    store_config: PipelineConfig, record: dict, tamper
) -> None:
    config = with_run(store_config, "run-a")
    run_dir = make_run_dir(config, created=T0)
    store = open_store(config.artifact_store, **config.store_options())
    first = publish_run(store, run_dir, record, config)
    assert set(first.uploaded) == published_keys(run_dir) and first.promoted
    run_store = store.child("runs/run-a")
    state = {key: run_store.rehash(key) for key in run_store.list_keys()}
    latest = store.get(LATEST)

    again = publish_run(store, run_dir, record, config)
    assert again.uploaded == [] and not again.promoted  # latest is already this run
    assert again.run_uri == first.run_uri
    assert {key: run_store.rehash(key) for key in run_store.list_keys()} == state
    assert store.get(LATEST) == latest  # same bytes, same version: not rewritten

    tamper(run_store, "model/model.params", None)
    repaired = publish_run(store, run_dir, record, config)
    assert repaired.uploaded == ["model/model.params"]
    assert verify_run(config, "run-a") == []


def test_a_run_id_is_never_overwritten_with_other_content(
    store_config: PipelineConfig, record: dict
) -> None:
    config = with_run(store_config, "run-a")
    run_dir = make_run_dir(config, created=T0)
    store = open_store(config.artifact_store, **config.store_options())
    publish_run(store, run_dir, record, config)
    stored_before = store.child("runs/run-a").rehash("report/report.md")

    (run_dir / "report/report.md").write_text("# a different report\n")
    with pytest.raises(ConflictError, match="already published with different content") as info:
        publish_run(store, run_dir, record, config)
    assert "runs/run-a" in str(info.value) and "report/report.md" in str(info.value)
    assert store.child("runs/run-a").rehash("report/report.md") == stored_before
    assert verify_run(config, "run-a") == []


def test_a_publisher_never_mixes_its_bytes_with_another_of_the_same_run_id(
    store_config: PipelineConfig, record: dict, tmp_path: Path
) -> None:
    """Issue 15, item 1: B has stored its objects but not yet its manifest when A publishes."""
    config = with_run(store_config, "run-twice")
    a_dir = make_run_dir(config, created=T0)
    b_config = config.model_copy(update={"work_dir": tmp_path / "host-b"})
    b_dir = make_run_dir(b_config, created=T0, accuracy=0.9)
    store = open_store(config.artifact_store, **config.store_options())
    store.ensure_writable()
    run_store = store.child("runs/run-twice")
    b_files = {key: (b_dir / key, sha256_of(b_dir / key)) for key in published_keys(b_dir)}
    run_store.sync(b_files)  # B, half-way: objects stored, no manifest yet
    with pytest.raises(ConflictError, match="already holds other bytes"):
        publish_run(store, a_dir, record, config)
    assert run_store.stat(MANIFEST) is None and store.stat(LATEST) is None
    assert {key: run_store.rehash(key).sha256 for key in b_files} == {
        key: digest for key, (_, digest) in b_files.items()
    }
    assert publish_run(store, b_dir, record, b_config).promoted  # B finishes: its own bytes
    assert verify_run(config, "run-twice") == []


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


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_documents_are_reported_never_crash(
    store_config: PipelineConfig, record: dict, tamper, capsys
) -> None:
    """Issue 15, item 8: store documents are validated; a damaged run is listed as damaged."""
    store = open_store(store_config.artifact_store, **store_config.store_options())
    store.ensure_writable()
    store.put(LATEST, b'{"run": "someone else\'s idea of latest"}')  # valid JSON, wrong fields
    config = with_run(store_config, "run-good")
    result = publish_run(store, make_run_dir(config, created=T0), record, config)
    assert result.promoted, result.promotion
    assert read_latest(store_config)["run_id"] == "run-good"

    good = store.get("runs/run-good/manifest.json").data
    damaged = {
        "run-wrong-fields": b'{"run_id": "run-wrong-fields"}',
        "run-nul-key": good.replace(b'"config.json"', b'"config\\u0000.json"'),
        "run-dot-key": good.replace(b'"config.json"', b'"."'),
        "run-dotdot-key": good.replace(b'"config.json"', b'"model/../../x"'),
        "run-huge-int": good.replace(b'"format": 1', b'"format": ' + b"9" * 5000),
        "run-huge-size": re.sub(rb'"size": \d+', b'"size": ' + b"9" * 40, good, count=1),
    }
    for run_id, data in damaged.items():
        store.put(f"runs/{run_id}/manifest.json", data)
    flags = ["--artifact-store", store_config.artifact_store]
    if store_config.s3_endpoint_url:
        flags += ["--s3-endpoint-url", store_config.s3_endpoint_url]
    assert cli.main(["artifacts", *flags, "list"]) == 0
    out = capsys.readouterr().out
    assert "run-good  accuracy 0.8400  gate passed" in out and "<- latest" in out
    for run_id in damaged:
        assert f"{run_id}  DAMAGED: " in out and "not a valid Manifest" in out
        assert cli.main(["artifacts", *flags, "verify", run_id]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "not a valid Manifest" in err

    # A latest.json whose manifest digest no longer matches marks no run as latest.
    tamper(store.child("runs/run-good"), MANIFEST, good.replace(b"0.84", b"0.99"))
    assert not any(run["latest"] for run in list_runs(store_config))


# --- latest.json ----------------------------------------------------------------------------------


def test_gate_failure_is_stored_but_not_promoted(
    store_config: PipelineConfig, record: dict
) -> None:
    store = open_store(store_config.artifact_store, **store_config.store_options())
    good = with_run(store_config, "run-good")
    publish_run(store, make_run_dir(good, created=T0), record, good)
    bad = with_run(store_config, "run-bad")
    run_dir = make_run_dir(bad, created=T0 + 60, accuracy=0.42, passed=False)

    result = publish_run(store, run_dir, record, bad)

    assert not result.promoted
    assert read_latest(store_config)["run_id"] == "run-good"
    runs = list_runs(store_config)
    assert [(r["run_id"], r["gate_passed"], r["latest"]) for r in runs] == [
        ("run-bad", False, False),
        ("run-good", True, True),
    ]
    assert "gate FAILED" in format_run_line(runs[0])


def test_latest_follows_publication_order_not_file_times(
    store_config: PipelineConfig, record: dict
) -> None:
    """A run whose files carry future times (a clock ahead, `cp -p`) does not pin latest.json."""
    store = open_store(store_config.artifact_store, **store_config.store_options())

    def publish_at(run_id: str, created: float):
        config = with_run(store_config, run_id)
        run_dir = make_run_dir(config, created=created)
        return publish_run(store, run_dir, record, config)

    year = 365 * 24 * 3600
    assert publish_at("run-from-the-future", time.time() + 10 * year).promoted
    later = publish_at("run-later", T0)  # published after it, files dated long before
    assert later.promoted, later.promotion
    latest = read_latest(store_config)
    assert latest["run_id"] == "run-later" and latest["manifest"] == "runs/run-later/manifest.json"
    manifest = store.get("runs/run-later/manifest.json").data
    assert latest["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert publish_at("run-newest", T0 - 100).promoted
    assert [r["run_id"] for r in list_runs(store_config)][0] == "run-newest"

    # Publishing an already promoted run again never moves latest.json back; the result says why.
    again = publish_at("run-later", T0)
    assert not again.promoted and "run-newest" in again.promotion
    assert read_latest(store_config)["run_id"] == "run-newest"


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


# --- crashes --------------------------------------------------------------------------------------

PUBLISHER = """
import json, resource, signal, sys
from pathlib import Path
from boto3.s3.transfer import TransferConfig
from pipeline.base.config import PipelineConfig
from pipeline.base.store import open_store
from tasks.publish.step import publish_run

args = json.loads(sys.argv[1])
if args.get("max_file_bytes"):
    # Die like a crash when a write passes the limit (Python itself ignores SIGXFSZ).
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["max_file_bytes"],) * 2)
config = PipelineConfig.model_validate_json(args["config"])
if args.get("start_at"):  # racing publishers: start together
    import time
    time.sleep(max(0.0, args["start_at"] - time.time()))
transfer = TransferConfig(**args["transfer"]) if args.get("transfer") else None
store = open_store(config.artifact_store, **config.store_options(), transfer=transfer)
publish_run(store, Path(args["run_dir"]), args["record"], config)
"""


def start_publisher(config: PipelineConfig, run_dir: Path, record: dict, **options):
    args = {"config": config.model_dump_json(), "run_dir": str(run_dir), "record": record}
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, json.dumps({**args, **options})],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def assert_incomplete_then_completed(
    config: PipelineConfig, run_dir: Path, record: dict, completed_before: set[str]
) -> None:
    """The killed run is invisible; publishing it again finishes it, re-sending only the rest."""
    assert list_runs(config) == []
    with pytest.raises(StoreError, match="publish did not finish"):
        show_run(config, config.run_id)
    assert completed_before, "nothing was stored before the kill"
    assert "model/large.bin" not in completed_before

    store = open_store(config.artifact_store, **config.store_options())
    result = publish_run(store, run_dir, record, config)
    assert "model/large.bin" in result.uploaded
    assert not completed_before & set(result.uploaded)
    assert [r["run_id"] for r in list_runs(config)] == [config.run_id]
    assert verify_run(config, config.run_id) == []


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


# --- damage and user errors -----------------------------------------------------------------------


def test_altered_object_is_reported_by_verify_and_pull(
    store_config: PipelineConfig, record: dict, tmp_path: Path, tamper
) -> None:
    config = with_run(store_config, "run-a")
    run_dir = make_run_dir(config, created=T0)
    store = open_store(config.artifact_store, **config.store_options())
    publish_run(store, run_dir, record, config)
    original = (run_dir / "model/model.params").read_bytes()
    tamper(store.child("runs/run-a"), "model/model.params", bytes(len(original)))

    problems = verify_run(config, "run-a")
    assert len(problems) == 1 and problems[0].startswith("model/model.params: SHA-256")
    with pytest.raises(IntegrityError, match="runs/run-a/model/model.params") as info:
        pull_run(config, "run-a", tmp_path / "pulled")
    assert hashlib.sha256(original).hexdigest() in str(info.value)
    assert not (tmp_path / "pulled" / "model" / "model.params").exists()
    assert not list((tmp_path / "pulled").rglob(".*.partial"))


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


def test_publishing_needs_an_evaluated_run(tmp_path: Path, record: dict) -> None:
    config = PipelineConfig(
        artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path, run_id="run-a"
    )
    store = open_store(config.artifact_store, **config.store_options())
    with pytest.raises(PublishError, match="does not exist"):
        publish_run(store, config.run_dir(), record, config)
    run_dir = make_run_dir(config, created=T0)
    (run_dir / "report/metrics.json").unlink()
    with pytest.raises(PublishError, match="metrics.json is missing: evaluate"):
        publish_run(store, run_dir, record, config)
    (run_dir / "report/metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(PublishError, match="gate.passed"):
        publish_run(store, run_dir, record, config)
    with pytest.raises(ConfigError, match="run_id is not set"):
        publish_run(store, run_dir, record, config.model_copy(update={"run_id": None}))
    assert not (tmp_path / "store" / "runs").exists()


def test_relative_file_store_uri(
    tmp_path: Path, dataset_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig(artifact_store="file://artifacts", run_id="run-a")
    run_dir = make_run_dir(config, created=T0)  # work/run-a, relative to the cwd
    uri = published(config, dataset_uri, run_dir.resolve().as_uri())
    assert uri == (tmp_path / "artifacts" / "runs" / "run-a").as_uri()
    assert (tmp_path / "artifacts" / "runs" / "run-a" / MANIFEST).is_file()
    assert read_latest(config)["run_id"] == "run-a"
