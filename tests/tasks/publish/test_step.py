"""tasks/publish/step.py: publishing a run, promoting latest, and the publish line."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest

from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.layout import LATEST, MANIFEST
from pipeline.base.store import (
    ConflictError,
    open_store,
)
from tasks.publish.artifacts import list_runs, show_run, verify_run
from tasks.publish.manifest import format_run_line
from tasks.publish.step import PublishError, publish_run
from tests.support.publish import T0, make_run_dir, published_keys, read_latest, sha256_of, with_run
from tests.support.steps import published


def test_the_training_restarts_are_recorded_in_the_manifest(
    store_config: PipelineConfig, data_uri: str
) -> None:
    config = with_run(store_config, "run-restarted")
    run_dir = make_run_dir(config, created=T0)
    restart = {"restart": 1, "rank": 1, "reason": "exited with status 137 (SIGKILL)",
               "from_epoch": 2, "num_proc": 1}  # fmt: skip
    # A line that is not a JSON object (a torn write) is left out, not fatal.
    (run_dir / "metrics/restarts.jsonl").write_text(json.dumps(restart) + "\n[1, 2\n")
    published(config, data_uri, run_dir.resolve().as_uri())
    manifest = show_run(config, "run-restarted")
    assert manifest["restarts"] == [restart]
    assert "metrics/restarts.jsonl" in manifest["objects"]


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
    tmp_path: Path, data_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig(artifact_store="file://artifacts", run_id="run-a")
    run_dir = make_run_dir(config, created=T0)  # work/run-a, relative to the cwd
    uri = published(config, data_uri, run_dir.resolve().as_uri())
    assert uri == (tmp_path / "artifacts" / "runs" / "run-a").as_uri()
    assert (tmp_path / "artifacts" / "runs" / "run-a" / MANIFEST).is_file()
    assert read_latest(config)["run_id"] == "run-a"


def published_line(config: PipelineConfig, data_uri: str, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tasks.publish.step"):
        published(config, data_uri, config.run_dir().resolve().as_uri())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("published")]
    return line


def test_the_publish_line_says_what_latest_does_once(
    tmp_path: Path, data_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PipelineConfig(artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path / "w")
    good = with_run(store, "run-good")
    make_run_dir(good, created=T0)
    first = published_line(good, data_uri, caplog)
    assert first.endswith("object(s) uploaded); latest.json points at it (promotion 1)"), first
    again = published_line(good, data_uri, caplog)
    assert again.endswith("(0 object(s) uploaded); latest.json already points at it"), again
    low = with_run(store, "run-low")
    make_run_dir(low, created=T0 + 1, accuracy=0.5, passed=False)
    refused = published_line(low, data_uri, caplog)
    assert refused.endswith("latest.json unchanged: run run-low did not pass the quality gate")
    for line in (first, again, refused):
        assert line.count("latest.json") == 1, line
