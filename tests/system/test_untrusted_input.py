# ruff: noqa: F811 (the fixtures imported from test_publish/test_faults are used as arguments)
"""Issue 22: what comes from a run directory, a store or a data file is untrusted, caused for
real: symlinks in a run directory and a store (item 1), documents far larger than any document
(item 2, a real sparse file on file:// and a real oversized object on SeaweedFS), control bytes
in a manifest (item 3) and an S3 endpoint that never answers (item 8)."""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.files import MAX_DOCUMENT_BYTES, UnsafeFileError
from pipeline.base.layout import LATEST, MANIFEST
from pipeline.base.logs import step_logger
from pipeline.base.store import FileStore, IntegrityError, open_store
from tasks.dataset.cache import read_record
from tasks.evaluate.gate import read_metrics
from tasks.evaluate.metrics import EvaluationError
from tasks.publish.step import PublishError, publish_run
from tests.support import REPO
from tests.support.documents import manifest_bytes
from tests.support.publish import T0, make_run_dir, with_run
from tests.support.steps import published

ROOT = REPO
SECRET = b"host secret: the publisher must never read this\n"
GIB = 1 << 30


def store_flags(config: PipelineConfig) -> list[str]:
    flags = ["--artifact-store", config.artifact_store]
    if config.s3_endpoint_url:
        flags += ["--s3-endpoint-url", config.s3_endpoint_url]
    return flags


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A mode-0600 file outside every run directory and store."""
    path = tmp_path / "host" / "secret"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def stored_bytes(config: PipelineConfig) -> list[bytes]:
    store = open_store(config.artifact_store, **config.store_options())
    return [store.get(key, max_bytes=1 << 30).data for key in store.list_keys()]


# --- item 1: links are refused, never followed ------------------------------------------------


@pytest.mark.parametrize("linked", ["model/model.params", "report"])
def test_a_symlink_in_the_run_dir_refuses_the_publish_and_uploads_nothing(
    store_config: PipelineConfig,
    data_uri: str,
    secret: Path,
    linked: str,
    capsys,
) -> None:
    config = with_run(store_config, "run-linked")
    run_dir = make_run_dir(config, created=T0)
    target = run_dir / linked
    if target.is_dir():  # a linked directory: its files would be read through the link
        (secret.parent / "metrics.json").write_bytes((target / "metrics.json").read_bytes())
        for child in sorted(target.iterdir()):
            child.unlink()
        target.rmdir()
        target.symlink_to(secret.parent, target_is_directory=True)
    else:
        target.unlink()
        target.symlink_to(secret)
    args = ["step", "publish", "--run-id", config.run_id, "--work-dir", str(config.work_dir)]
    data_dir = data_uri.removeprefix("file://")
    code = cli.main([*args, "--data-dir", data_dir, *store_flags(config)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and linked in err
    assert "symbolic link" in err and "nothing was uploaded" in err
    assert stored_bytes(config) == []  # not the secret, not anything
    with pytest.raises(PublishError, match="symbolic link"):
        published(config, data_uri, run_dir.resolve().as_uri())


def test_evaluate_refuses_a_linked_model_file(tmp_path: Path, secret: Path) -> None:
    from tasks.evaluate.model_io import ModelFormatError, load_model

    config = PipelineConfig(work_dir=tmp_path / "work", run_id="run-evaluate-link")
    run_dir = make_run_dir(config, created=T0)
    params = run_dir / "model/model-0000.params"
    params.unlink()
    params.symlink_to(secret)
    with pytest.raises(ModelFormatError, match=r"model/model-0000\.params is a symbolic link"):
        load_model(run_dir, str(run_dir))


def test_pull_and_verify_refuse_a_linked_object_in_a_file_store(
    tmp_path: Path,
    secret: Path,
    record: dict,
    capsys,
) -> None:
    config = PipelineConfig(
        artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path / "work", run_id="run-p"
    )
    store = open_store(config.artifact_store)
    publish_run(store, make_run_dir(config, created=T0), record, config)
    stored = tmp_path / "store/runs/run-p/model/model.params"
    stored.unlink()
    stored.symlink_to(secret)
    dest = tmp_path / "pulled"
    for action in (["pull", "run-p", str(dest)], ["verify", "run-p"]):
        assert cli.main(["artifacts", *store_flags(config), *action]) == 1
        err = capsys.readouterr().err
        assert "model/model.params is a symbolic link" in err, err
    pulled = [p.read_bytes() for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
    assert SECRET not in pulled


def test_evaluate_and_the_checkpoint_mirror_refuse_linked_run_files(
    tmp_path: Path, secret: Path
) -> None:
    from tasks.evaluate.step import read_training_metrics
    from tasks.train.store_checkpoints import mirror_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "metrics/train.json").symlink_to(secret)
    with pytest.raises(EvaluationError, match=r"train\.json is a symbolic link"):
        read_training_metrics(run_dir)
    pointer = {"epoch": 1, "params": "epoch-0001.params", "optimizer": "epoch-0001.optimizer",
               "best_epoch": 1, "best_params": "epoch-0001.params", "history": [],
               "trajectory": {}, "digests": {"epoch-0001.params": "0" * 64,
                                             "epoch-0001.optimizer": "0" * 64}}  # fmt: skip
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints/checkpoint.json").write_text(json.dumps(pointer))
    (run_dir / "checkpoints/epoch-0001.params").symlink_to(secret)
    (run_dir / "checkpoints/epoch-0001.optimizer").write_bytes(b"optimizer")
    store = FileStore(tmp_path / "store")
    with pytest.raises(UnsafeFileError, match=r"epoch-0001\.params is a symbolic link"):
        mirror_checkpoint(store, run_dir, keep=2)
    assert store.list_keys() == []


# --- item 2: every document read stops at its bound --------------------------------------------


def sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)  # a real file of that size, holding no disk blocks
    return path


def test_a_sparse_4_gib_latest_and_manifest_are_refused_unread_under_a_memory_limit(
    tmp_path: Path,
    record: dict,
) -> None:
    """`artifacts list` in its own process, its address space limited to 1.5 GiB: reading
    either document whole would need 4 GiB (a MemoryError traceback before issue 22)."""
    config = PipelineConfig(
        artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path / "work", run_id="run-ok"
    )
    publish_run(open_store(config.artifact_store), make_run_dir(config, created=T0), record, config)
    sparse(tmp_path / "store" / LATEST, 4 * GIB)
    sparse(tmp_path / "store/runs/run-huge" / MANIFEST, 4 * GIB)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * GIB // 2, 3 * GIB // 2))

    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "artifacts", *store_flags(config), "list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        preexec_fn=limit_memory,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    too_big = f"{4 * GIB} bytes, more than the {MAX_DOCUMENT_BYTES} a document may have"
    assert f"latest.json: {too_big}" in result.stderr  # the warning names the object
    assert "run-huge  DAMAGED: " in result.stdout and f"manifest.json: {too_big}" in result.stdout
    assert "run-ok  accuracy 0.8400" in result.stdout
    assert elapsed < 60, elapsed  # reading 4 GiB took 25 s here; refusing it takes nothing


def test_oversized_local_documents_are_refused_unread(tmp_path: Path, data_uri: str) -> None:
    report = tmp_path / "report"
    sparse(report / "metrics.json", 4 * GIB)
    with pytest.raises(EvaluationError, match=r"metrics\.json: 4294967296 bytes, more than"):
        read_metrics(str(report))
    cache = tmp_path / "cache"
    sparse(cache / layout.DATASET_RECORD, 4 * GIB)
    with pytest.raises(Exception, match=r"dataset\.json: 4294967296 bytes, more than"):
        read_record(cache.as_uri())


@pytest.mark.s3
def test_an_oversized_object_on_s3_is_refused_after_a_bounded_read(
    s3_env, s3_store_uri: str, tmp_path: Path
) -> None:
    config = PipelineConfig(artifact_store=s3_store_uri, s3_endpoint_url=s3_env.endpoint)
    store = open_store(config.artifact_store, **config.store_options())
    size = MAX_DOCUMENT_BYTES + 1
    body = tmp_path / "big.json"
    sparse(body, size)
    s3_env.client().upload_file(str(body), s3_env.bucket, f"{store.prefix}/{LATEST}")
    with pytest.raises(IntegrityError, match=f"latest.json: {size} bytes, more than"):
        store.get(LATEST)
    with pytest.raises(IntegrityError, match="more than the 1024 a document may have"):
        store.get(LATEST, max_bytes=1024)  # the checkpoint pointer's reader passes its own bound


# --- item 3: control bytes never reach a terminal or a log line raw ---------------------------


def test_control_bytes_from_a_store_are_escaped_in_list_show_verify_and_logs(
    tmp_path: Path, capsys, caplog
) -> None:
    store = FileStore(tmp_path / "store")
    evil_key = "model/\x1b[2J\x1b]0;pwned\x07.params"
    objects = {evil_key: {"size": 1, "sha256": "0" * 64}}
    store.put("runs/run-esc/manifest.json", manifest_bytes("run-esc", objects))
    data = json.loads(store.get("runs/run-esc/manifest.json").data)
    data["created_at"] = "\x1b[31m2026-01-01\x1b[0m"
    store.put("runs/run-esc/manifest.json", json.dumps(data).encode())
    nul = manifest_bytes("run-nul", {"config.json": {"size": 1, "sha256": "0" * 64}})
    store.put("runs/run-nul/manifest.json", nul.replace(b'"config.json"', b'"\\u001b[2Jx\\u0000"'))
    flags = ["--artifact-store", store.uri]
    for action in (["list"], ["show", "run-esc"], ["verify", "run-esc"], ["show", "run-nul"]):
        cli.main(["artifacts", *flags, *action])
        captured = capsys.readouterr()
        shown = captured.out + captured.err
        assert not any(c in shown for c in "\x1b\x07\x00"), (action, shown)
        assert "\\x1b[2J" in shown or "\\u001b[2J" in shown, (action, shown)
    with caplog.at_level(logging.INFO):
        step_logger("tests.untrusted").info("object %s", evil_key)
    assert caplog.records[-1].getMessage() == "object model/\\x1b[2J\\x1b]0;pwned\\x07.params"


# --- item 8: a hung endpoint costs one deadline, whatever the attempts ------------------------


def test_a_hung_s3_endpoint_costs_one_call_deadline_whatever_the_attempts(
    hung_endpoint: str,
    fake_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    """30 s reads x 10 attempts would be 300 s a call; the 2 s deadline ends it."""
    for name in ("S3_READ_TIMEOUT", "S3_MAX_ATTEMPTS", "S3_CALL_DEADLINE"):
        monkeypatch.delenv(f"PIPELINE_{name}", raising=False)
    start = time.monotonic()
    code = cli.main(
        [
            "artifacts",
            *["--artifact-store", "s3://bucket/p", "--s3-endpoint-url", hung_endpoint],
            *["--s3-read-timeout", "30", "--s3-max-attempts", "10", "--s3-call-deadline", "2"],
            "list",
        ]
    )
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(
        f"error: cannot reach S3 endpoint {hung_endpoint}"
    )
    assert "2 s deadline of a store call" in err
    assert 2 <= elapsed < 10, elapsed  # the deadline, plus the imports


def test_the_call_deadline_is_a_config_option(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("S3_CONNECT_TIMEOUT", "S3_READ_TIMEOUT", "S3_MAX_ATTEMPTS", "S3_CALL_DEADLINE"):
        monkeypatch.delenv(f"PIPELINE_{name}", raising=False)
    assert PipelineConfig().s3_timeouts() == (5.0, 30.0, None, 60.0)
    monkeypatch.setenv("PIPELINE_S3_CALL_DEADLINE", "5")
    assert PipelineConfig().store_options()["timeouts"] == (5.0, 30.0, None, 5.0)
