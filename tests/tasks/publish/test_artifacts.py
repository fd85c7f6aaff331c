"""tasks/publish/artifacts.py: list, show, pull and verify published runs (also through
`pipeline artifacts`), and damage they report."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.base.config import PipelineConfig
from pipeline.base.layout import LATEST, MANIFEST
from pipeline.base.store import (
    IntegrityError,
    open_store,
)
from tasks.dataset import read_record
from tasks.publish.artifacts import list_runs, pull_run, show_run, verify_run
from tasks.publish.manifest import format_run_line
from tasks.publish.step import publish_run
from tests.support.publish import T0, make_run_dir, published_keys, read_latest, with_run
from tests.support.steps import for_run, published

# --- the whole path -----------------------------------------------------------------------------


def test_publish_then_list_show_pull_verify(
    store_config: PipelineConfig, data_uri: str, tmp_path: Path
) -> None:
    config = with_run(store_config, "run-a")
    run_dir = make_run_dir(config, created=T0)

    uri = published(config, data_uri, run_dir.resolve().as_uri())

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
    assert manifest["dataset"] == read_record(data_uri)
    given = for_run(config, data_uri, run_dir.resolve())  # the config the step was given
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
