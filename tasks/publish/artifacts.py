"""The artifacts browser: `pipeline artifacts list|show|pull|verify` over a store's runs.

Every document is validated before use: a damaged run is listed as damaged, a damaged
latest.json (or one whose manifest digest does not match) marks no run as latest.
"""

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
    read_manifest,
)
from pipeline.base.store.documents import Latest, Manifest, parse_document
from tasks.publish.manifest import damaged_summary, object_problems, run_summary


def _published(config: PipelineConfig, run_id: str) -> tuple[ArtifactStore, Manifest]:
    store = open_store(config.artifact_store, **config.store_options())
    run_store = store.child(layout.run_key(run_id))
    found = read_manifest(run_store)
    if found is None:
        raise StoreError(
            f"run {run_id!r} is not in {store.uri}: no {run_store.key_uri(layout.MANIFEST)} (never "
            "published, or its publish did not finish)"
        )
    return run_store, found[0]


def verified_latest(store: ArtifactStore) -> Latest | None:
    """latest.json, if it is valid and its manifest still has the digest it records."""
    blob = store.get(layout.LATEST)
    if blob is None:
        return None
    latest = parse_document(Latest, blob.data, store.key_uri(layout.LATEST))
    found = read_manifest(store.child(layout.run_key(latest.run_id)))
    if found is None or found[1] != latest.manifest_sha256:
        raise IntegrityError(
            f"{store.key_uri(layout.LATEST)} names run {latest.run_id}, whose manifest is "
            f"{'missing' if found is None else 'not the one it recorded (SHA-256 differs)'}"
        )
    return latest


def _run_entry(store: ArtifactStore, run_id: str, latest_run_id: str | None) -> dict:
    try:
        found = read_manifest(store.child(layout.run_key(run_id)))
    except IntegrityError as exc:
        return damaged_summary(run_id, str(exc))
    if found is None:
        return {}
    return run_summary(found[0], latest_run_id)


def list_runs(config: PipelineConfig) -> list[dict]:
    """The complete runs of the artifact store (those with a manifest), newest published first;
    runs whose manifest is damaged are listed as damaged."""
    store = open_store(config.artifact_store, **config.store_options())
    try:
        latest = verified_latest(store)
    except IntegrityError as exc:
        step_logger(__name__).warning("%s", exc)
        latest = None
    latest_run_id = latest.run_id if latest else None
    runs = [_run_entry(store, run_id, latest_run_id) for run_id in store.list_dirs(layout.RUNS)]
    return sorted((run for run in runs if run), key=lambda run: run["order"], reverse=True)


def show_run(config: PipelineConfig, run_id: str) -> dict:
    """The manifest of a published run."""
    return _published(config, run_id)[1].model_dump(mode="json")


def pull_run(config: PipelineConfig, run_id: str, dest: Path) -> Path:
    """Download a published run into `dest`, verifying every object's SHA-256."""
    run_store, manifest = _published(config, run_id)
    return download_run(run_store, manifest, dest).absolute()


def verify_run(config: PipelineConfig, run_id: str) -> list[str]:
    """Re-hash every stored object of a run; one line per object that differs from its manifest."""
    run_store, manifest = _published(config, run_id)
    expected = manifest.expected()
    return object_problems(expected, run_store.rehash_many(sorted(expected)))
