"""Publish step: a finished run directory -> the artifact store, verifiably.

Pure core: `build_manifest`, `latest_record`, `is_newer`, `object_problems`, `run_summary`,
`format_run_line`.
Shell: `publish` (the flow's step) and `publish_run`, `promote_latest`; for the CLI
`list_runs`, `show_run`, `pull_run` and `verify_run`.

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
import logging
import random
import subprocess
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.store import (
    LATEST,
    MANIFEST,
    RUNS,
    ArtifactStore,
    ConflictError,
    IntegrityError,
    ObjectInfo,
    StoreError,
    download_run,
    materialize,
    open_store,
    read_json,
    sha256_file,
)
from tasks.dataset import read_record

logger = logging.getLogger(__name__)

EXCLUDED_DIRS = ("checkpoints",)  # resumable training state: local only, never published
METRICS = "report/metrics.json"
LATEST_ATTEMPTS = 8
MANIFEST_FORMAT = 1


class PublishError(PipelineError):
    """A run directory that cannot be published as it is; the message says what is missing."""


class PublishResult(NamedTuple):
    run_uri: str  # the published run in the store
    uploaded: list[str]  # keys sent this time (the others were already stored, same SHA-256)
    promoted: bool  # whether latest.json now points at this run


# --- pure core ----------------------------------------------------------------------------------


def _utc(timestamp: float) -> str:
    # Fixed-width ISO 8601 in UTC, so that string order is time order.
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")


def build_manifest(
    *,
    run_id: str,
    objects: Mapping[str, dict],
    created_at: str,
    published_at: str,
    dataset: dict,
    config: dict,
    metrics: dict,
    code_revision: str,
    flow_run_id: str | None,
) -> dict:
    """The record of a published run: what it is made of and how it was made."""
    return {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "created_at": created_at,
        "published_at": published_at,
        "code_revision": code_revision,
        "flow_run_id": flow_run_id,
        "dataset": dataset,
        "config": config,
        "metrics": metrics,
        "objects": dict(sorted(objects.items())),
    }


def latest_record(manifest: dict) -> dict:
    """What latest.json holds for a run."""
    return {
        "run_id": manifest["run_id"],
        "created_at": manifest["created_at"],
        "accuracy": manifest["metrics"]["accuracy"],
        "manifest": f"{RUNS}/{manifest['run_id']}/{MANIFEST}",
    }


def is_newer(candidate: dict, current: dict) -> bool:
    """Whether run `candidate` was created after `current` (the run id breaks ties)."""
    return (candidate["created_at"], candidate["run_id"]) > (
        current["created_at"],
        current["run_id"],
    )


def object_problems(
    expected: Mapping[str, dict], stored: Mapping[str, ObjectInfo | None]
) -> list[str]:
    """One line per object whose stored size or SHA-256 differs from the manifest."""
    problems = []
    for key, entry in sorted(expected.items()):
        info = stored.get(key)
        if info is None:
            problems.append(f"{key}: missing")
        elif info.size != entry["size"]:
            problems.append(f"{key}: {info.size} bytes stored, manifest says {entry['size']}")
        elif info.sha256 != entry["sha256"]:
            problems.append(f"{key}: SHA-256 {info.sha256} stored, manifest says {entry['sha256']}")
    return problems


def run_summary(manifest: dict, latest_run_id: str | None) -> dict:
    """One line's worth of a published run, for `pipeline artifacts list`."""
    return {
        "run_id": manifest["run_id"],
        "created_at": manifest["created_at"],
        "published_at": manifest["published_at"],
        "accuracy": manifest["metrics"]["accuracy"],
        "gate_passed": manifest["metrics"]["gate"]["passed"],
        "latest": manifest["run_id"] == latest_run_id,
    }


def format_run_line(run: dict) -> str:
    created = run["created_at"][:19].replace("T", " ")
    gate = "passed" if run["gate_passed"] else "FAILED"
    line = f"{run['run_id']}  accuracy {run['accuracy']:.4f}  gate {gate}  created {created} UTC"
    return line + ("  <- latest" if run["latest"] else "")


# --- reading the run directory ------------------------------------------------------------------


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
            and relative.parts[0] not in EXCLUDED_DIRS
            and relative.as_posix() != MANIFEST
            and not any(part.startswith(".") for part in relative.parts)
        ):
            files[relative.as_posix()] = path
    return files


def read_metrics(run_dir: Path) -> dict:
    """The evaluate step's report/metrics.json, checked for what publishing needs."""
    path = run_dir / METRICS
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(f"{path} is missing: evaluate the run before publishing it") from None
    except (OSError, ValueError) as exc:
        raise PublishError(f"{path}: cannot read the metrics ({exc})") from exc
    gate = metrics.get("gate") if isinstance(metrics, dict) else None
    if not (
        isinstance(gate, dict)
        and isinstance(gate.get("passed"), bool)
        and isinstance(metrics.get("accuracy"), int | float)
    ):
        raise PublishError(f"{path}: needs 'accuracy' and 'gate.passed' (the evaluate step's)")
    return metrics


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


# --- publishing ---------------------------------------------------------------------------------


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
        run_store.put(MANIFEST, _json_bytes(manifest), if_none_match=True)
        written = True
    except ConflictError:
        written = False  # a concurrent publisher of this run id won; fine if it is identical
    stored = read_json(run_store, MANIFEST)
    if stored is None or (written and stored != manifest):
        raise IntegrityError(f"{run_store.key_uri(MANIFEST)} does not read back as written")
    _check_same_run(stored, manifest["objects"], run_store.uri)
    return stored


def promote_latest(store: ArtifactStore, manifest: dict) -> bool:
    """Point latest.json at this run unless it already points at a newer one.

    Compare-and-swap: the write succeeds only if latest.json is still the version read, so
    concurrent publishers never lose an update; the loser re-reads and decides again.
    """
    candidate = latest_record(manifest)
    for attempt in range(LATEST_ATTEMPTS):
        current = store.get(LATEST)
        try:
            current_record = json.loads(current.data) if current else None
        except ValueError:
            logger.warning("%s is not valid JSON; replacing it", store.key_uri(LATEST))
            current_record = None
        if current_record is not None and not is_newer(candidate, current_record):
            return False
        document = {**candidate, "updated_at": _utc(time.time())}
        try:
            store.put(
                LATEST,
                _json_bytes(document),
                if_match=current.etag if current else None,
                if_none_match=current is None,
            )
            return True
        except ConflictError:
            time.sleep(random.uniform(0, 0.05 * 2**attempt))  # jitter: let the other one finish
    raise StoreError(
        f"{store.key_uri(LATEST)}: gave up after {LATEST_ATTEMPTS} attempts, each lost to a "
        "concurrent publisher"
    )


def publish_run(
    store: ArtifactStore, run_dir: Path, dataset_record: dict, config: PipelineConfig
) -> PublishResult:
    """Publish the local run directory `run_dir` as run `config.run_id` of `store`."""
    config.run_dir()  # raises a clear ConfigError when the flow has not set a run id
    run_id = config.run_id
    files = scan_run_dir(run_dir)
    metrics = read_metrics(run_dir)
    local = {key: (path, sha256_file(path)) for key, path in files.items()}
    objects = {
        key: {"size": path.stat().st_size, "sha256": digest}
        for key, (path, digest) in local.items()
    }
    store.ensure_writable()
    run_store = store.child(f"{RUNS}/{run_id}")
    published = read_json(run_store, MANIFEST)
    if published is not None:
        _check_same_run(published, objects, run_store.uri)  # before touching any object
    uploaded = run_store.sync(local)
    if published is None:
        manifest = build_manifest(
            run_id=run_id,
            objects=objects,
            # The run's age is that of its oldest artifact, so a retried or delayed publish
            # of an older run never moves latest.json backwards.
            created_at=_utc(min(path.stat().st_mtime for path in files.values())),
            published_at=_utc(time.time()),
            dataset=dataset_record,
            config=config.model_dump(mode="json"),
            metrics=metrics,
            code_revision=code_revision(),
            flow_run_id=flow_run_id(),
        )
        published = _write_manifest(run_store, manifest)
    promoted = published["metrics"]["gate"]["passed"] and promote_latest(store, published)
    return PublishResult(run_store.uri, uploaded, promoted)


def publish(config: PipelineConfig, run_dir_uri: str, data_uri: str) -> str:
    """The flow's publish step: returns the URI of the published run."""
    store = open_store(config.artifact_store, config)
    run_dir = materialize(run_dir_uri, config.run_dir(), config)
    result = publish_run(store, run_dir, read_record(data_uri), config)
    print(
        f"published run {config.run_id} to {result.run_uri} ({len(result.uploaded)} object(s) "
        f"uploaded); latest.json {'points at it' if result.promoted else 'unchanged'}"
    )
    return result.run_uri


# --- the CLI's `pipeline artifacts ...` -------------------------------------------------------


def _published(config: PipelineConfig, run_id: str) -> tuple[ArtifactStore, dict]:
    store = open_store(config.artifact_store, config)
    run_store = store.child(f"{RUNS}/{run_id}")
    manifest = read_json(run_store, MANIFEST)
    if manifest is None:
        raise StoreError(
            f"run {run_id!r} is not in {store.uri}: no {run_store.key_uri(MANIFEST)} (never "
            "published, or its publish did not finish)"
        )
    return run_store, manifest


def list_runs(config: PipelineConfig) -> list[dict]:
    """The complete runs of the artifact store (those with a manifest), newest first."""
    store = open_store(config.artifact_store, config)
    try:
        latest = read_json(store, LATEST)
    except IntegrityError as exc:
        logger.warning("%s", exc)
        latest = None
    latest_run_id = latest.get("run_id") if latest else None
    runs = []
    for run_id in store.list_dirs(RUNS):
        try:
            manifest = read_json(store.child(f"{RUNS}/{run_id}"), MANIFEST)
        except IntegrityError as exc:
            logger.warning("skipping run %s: %s", run_id, exc)
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
