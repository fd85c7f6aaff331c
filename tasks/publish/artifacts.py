"""The artifacts browser: `pipeline artifacts list|show|pull|verify` over a store's runs."""

from __future__ import annotations

from pathlib import Path

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.logs import step_logger
from pipeline.base.store import (
    ArtifactStore,
    IntegrityError,
    StoreError,
    download_run,
    open_store,
    read_json,
)
from tasks.publish.manifest import object_problems, run_summary


def _published(config: PipelineConfig, run_id: str) -> tuple[ArtifactStore, dict]:
    store = open_store(config.artifact_store, **config.store_options())
    run_store = store.child(layout.run_key(run_id))
    manifest = read_json(run_store, layout.MANIFEST)
    if manifest is None:
        raise StoreError(
            f"run {run_id!r} is not in {store.uri}: no {run_store.key_uri(layout.MANIFEST)} (never "
            "published, or its publish did not finish)"
        )
    return run_store, manifest


def list_runs(config: PipelineConfig) -> list[dict]:
    """The complete runs of the artifact store (those with a manifest), newest first."""
    store = open_store(config.artifact_store, **config.store_options())
    try:
        latest = read_json(store, layout.LATEST)
    except IntegrityError as exc:
        step_logger(__name__).warning("%s", exc)
        latest = None
    latest_run_id = latest.get("run_id") if latest else None
    runs = []
    for run_id in store.list_dirs(layout.RUNS):
        try:
            manifest = read_json(store.child(layout.run_key(run_id)), layout.MANIFEST)
        except IntegrityError as exc:
            step_logger(__name__).warning("skipping run %s: %s", run_id, exc)
            continue
        if manifest is not None:
            runs.append(run_summary(manifest, latest_run_id))
    return sorted(runs, key=lambda run: (run["created_at"], run["run_id"]), reverse=True)


def show_run(config: PipelineConfig, run_id: str) -> dict:
    """The manifest of a published run."""
    return _published(config, run_id)[1]


def pull_run(config: PipelineConfig, run_id: str, dest: Path) -> Path:
    """Download a published run into `dest`, verifying every object's SHA-256."""
    run_store, manifest = _published(config, run_id)
    return download_run(run_store, manifest, dest).absolute()


def verify_run(config: PipelineConfig, run_id: str) -> list[str]:
    """Re-hash every stored object of a run; one line per object that differs from its manifest."""
    run_store, manifest = _published(config, run_id)
    expected = manifest["objects"]
    return object_problems(expected, run_store.rehash_many(sorted(expected)))
