"""Publish step: a finished run directory -> the artifact store, verifiably.

Order of writes, so that a crash at any point leaves the store consistent:
1. every object of the run, skipping those already stored with the same SHA-256;
2. runs/<id>/manifest.json, create-only: a run id never changes content, and a run without a
   manifest is incomplete, so every reader ignores it;
3. latest.json, only once the manifest reads back as written and the quality gate passed, by
   compare-and-swap (retried a bounded number of times) and only forward in time.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.logs import step_logger
from pipeline.base.store import (
    ArtifactStore,
    ConflictError,
    IntegrityError,
    StoreError,
    materialize,
    open_store,
    read_json,
    sha256_file,
)
from tasks.dataset import read_record
from tasks.evaluate.gate import read_metrics
from tasks.evaluate.metrics import EvaluationError
from tasks.publish.manifest import (
    build_manifest,
    is_newer,
    latest_record,
    parse_restarts,
    utc_iso,
)

LATEST_ATTEMPTS = 8


class PublishError(PipelineError):
    """A run directory that cannot be published as it is; the message says what is missing."""


class PublishResult(NamedTuple):
    run_uri: str  # the published run in the store
    uploaded: list[str]  # keys sent this time (the others were already stored, same SHA-256)
    promoted: bool  # whether latest.json now points at this run


def scan_run_dir(run_dir: Path) -> dict[str, Path]:
    """The files of a local run directory to publish, by store key.

    Everything except checkpoints/, hidden files and a local manifest.json (the store
    writes its own).
    """
    if not run_dir.is_dir():
        raise PublishError(f"run directory {run_dir} does not exist")
    files = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if (
            path.is_file()
            and relative.parts[0] not in layout.UNPUBLISHED_DIRS
            and relative.as_posix() != layout.MANIFEST
            and not any(part.startswith(".") for part in relative.parts)
        ):
            files[relative.as_posix()] = path
    return files


def code_revision() -> str:
    """The git commit of this checkout ('+dirty' with local changes), else the package version."""
    source = str(Path(__file__).resolve().parent)
    try:
        git = ["git", "-C", source]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return f"git:{commit}" + ("+dirty" if changes else "")
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package), or no git
    try:
        return f"fashion-pipeline=={importlib.metadata.version('fashion-pipeline')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def flow_run_id() -> str | None:
    """The Prefect flow run this publish belongs to, None outside a flow run."""
    # Imported here: prefect is slow to import and the CLI's `artifacts` commands do not need it.
    from prefect.runtime import flow_run

    return flow_run.id


def _json_bytes(document: dict) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode()


def _check_same_run(published: dict, objects: Mapping[str, dict], run_uri: str) -> None:
    differing = sorted(
        key
        for key in published["objects"].keys() | objects.keys()
        if published["objects"].get(key) != objects.get(key)
    )
    if differing:
        raise ConflictError(
            f"run {run_uri} is already published with different content ({len(differing)} "
            f"object(s) differ, e.g. {differing[0]}); publish it under a new run id"
        )


def _write_manifest(run_store: ArtifactStore, manifest: dict) -> dict:
    """Write the manifest create-only, read it back and return what the store holds."""
    try:
        run_store.put(layout.MANIFEST, _json_bytes(manifest), if_none_match=True)
        written = True
    except ConflictError:
        written = False  # a concurrent publisher of this run id won; fine if it is identical
    stored = read_json(run_store, layout.MANIFEST)
    if stored is None or (written and stored != manifest):
        raise IntegrityError(f"{run_store.key_uri(layout.MANIFEST)} does not read back as written")
    _check_same_run(stored, manifest["objects"], run_store.uri)
    return stored


def promote_latest(store: ArtifactStore, manifest: dict) -> bool:
    """Point latest.json at this run unless it already points at a newer one.

    Compare-and-swap: the write succeeds only if latest.json is still the version read, so
    concurrent publishers never lose an update; the loser re-reads and decides again.
    """
    candidate = latest_record(manifest)
    for attempt in range(LATEST_ATTEMPTS):
        current = store.get(layout.LATEST)
        try:
            current_record = json.loads(current.data) if current else None
        except ValueError:
            step_logger(__name__).warning(
                "%s is not valid JSON; replacing it", store.key_uri(layout.LATEST)
            )
            current_record = None
        if current_record is not None and not is_newer(candidate, current_record):
            return False
        document = {**candidate, "updated_at": utc_iso(time.time())}
        try:
            store.put(
                layout.LATEST,
                _json_bytes(document),
                if_match=current.etag if current else None,
                if_none_match=current is None,
            )
            return True
        except ConflictError:
            time.sleep(random.uniform(0, 0.05 * 2**attempt))  # jitter: let the other one finish
    raise StoreError(
        f"{store.key_uri(layout.LATEST)}: gave up after {LATEST_ATTEMPTS} attempts, each lost to a "
        "concurrent publisher"
    )


def read_restarts(run_dir: Path) -> list[dict]:
    """The training's restarts recorded in the run directory (none when the file is absent)."""
    try:
        return parse_restarts((run_dir / layout.TRAIN_RESTARTS).read_text(errors="replace"))
    except FileNotFoundError:
        return []


def publish_run(
    store: ArtifactStore, run_dir: Path, dataset_record: dict, config: PipelineConfig
) -> PublishResult:
    """Publish the local run directory `run_dir` as run `config.run_id` of `store`."""
    config.run_dir()  # raises a clear ConfigError when the flow has not set a run id
    run_id = config.run_id
    files = scan_run_dir(run_dir)
    try:
        metrics = read_metrics(str(run_dir / layout.REPORT_DIR))
    except EvaluationError as exc:
        raise PublishError(str(exc)) from None
    local = {key: (path, sha256_file(path)) for key, path in files.items()}
    objects = {
        key: {"size": path.stat().st_size, "sha256": digest}
        for key, (path, digest) in local.items()
    }
    store.ensure_writable()
    run_store = store.child(layout.run_key(run_id))
    published = read_json(run_store, layout.MANIFEST)
    if published is not None:
        _check_same_run(published, objects, run_store.uri)  # before touching any object
    uploaded = run_store.sync(local)
    if published is None:
        manifest = build_manifest(
            run_id=run_id,
            objects=objects,
            # The run's age is that of its oldest artifact, so a retried or delayed publish
            # of an older run never moves latest.json backwards.
            created_at=utc_iso(min(path.stat().st_mtime for path in files.values())),
            published_at=utc_iso(time.time()),
            dataset=dataset_record,
            config=config.model_dump(mode="json"),
            metrics=metrics,
            code_revision=code_revision(),
            flow_run_id=flow_run_id(),
            restarts=read_restarts(run_dir),
        )
        published = _write_manifest(run_store, manifest)
    promoted = published["metrics"]["gate"]["passed"] and promote_latest(store, published)
    return PublishResult(run_store.uri, uploaded, promoted)


def publish(config: PipelineConfig, data_uri: str, run_dir_uri: str) -> str:
    """The flow's publish step: returns the URI of the published run."""
    store = open_store(config.artifact_store, **config.store_options())
    run_dir = materialize(run_dir_uri, config.run_dir(), config.s3_endpoint_url)
    result = publish_run(store, run_dir, read_record(data_uri), config)
    step_logger(__name__).info(
        f"published run {config.run_id} to {result.run_uri} ({len(result.uploaded)} object(s) "
        f"uploaded); latest.json {'points at it' if result.promoted else 'unchanged'}"
    )
    return result.run_uri
