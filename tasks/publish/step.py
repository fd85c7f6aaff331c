"""Publish step: a finished run directory -> the artifact store, verifiably.

Order of writes, so that a crash at any point leaves the store consistent:
1. every object of the run, create-only (skipping those already stored with the same SHA-256):
   two publishers of one run id never mix their bytes;
2. runs/<id>/manifest.json, create-only: a run id never changes content, and a run without a
   manifest is incomplete, so every reader ignores it. It records how many promotions the
   store had seen (`published_after`): runs are ordered by publication, not by any clock;
3. every stored object re-hashed against the manifest: a run that does not verify is never
   promoted;
4. latest.json, only if the quality gate passed and no run published after this one is
   latest, by compare-and-swap (retried a bounded number of times); it records the
   manifest's SHA-256, which readers check.
"""

from __future__ import annotations

import importlib.metadata
import random
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.files import (
    MAX_DOCUMENT_BYTES,
    UnsafeFileError,
    file_sha256,
    open_no_links,
    read_document_file,
)
from pipeline.base.logs import step_logger
from pipeline.base.store import (
    ArtifactStore,
    Blob,
    ConflictError,
    IntegrityError,
    StoreError,
    local_run,
    open_store,
    read_manifest,
)
from pipeline.base.store.documents import (
    Latest,
    Manifest,
    digest,
    document_bytes,
    object_problems,
    parse_document,
)
from tasks.dataset import read_record
from tasks.evaluate.gate import read_metrics
from tasks.evaluate.metrics import EvaluationError
from tasks.publish.manifest import (
    build_manifest,
    latest_record,
    parse_restarts,
    promotion_refusal,
    utc_iso,
)

LATEST_ATTEMPTS = 8


class PublishError(PipelineError):
    """A run directory that cannot be published as it is; the message says what is missing."""


class PublishResult(NamedTuple):
    run_uri: str  # the published run in the store
    uploaded: list[str]  # keys sent this time (the others were already stored, same SHA-256)
    promoted: bool  # whether latest.json now points at this run
    promotion: str = ""  # why (not): e.g. the run published after it that latest.json names


class Promotion(NamedTuple):
    promoted: bool
    reason: str


def scan_run_dir(run_dir: Path) -> dict[str, Path]:
    """The files of a local run directory to publish, by store key.

    Everything except checkpoints/, hidden files and a local manifest.json (the store
    writes its own). A symbolic link anywhere in it (file or directory) refuses the run: the
    work directory is untrusted, and a link would publish whatever file it points at.
    """
    if not run_dir.is_dir():
        raise PublishError(f"run directory {run_dir} does not exist")
    files = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if (
            relative.parts[0] in layout.UNPUBLISHED_DIRS
            or relative.as_posix() == layout.MANIFEST
            or any(part.startswith(".") for part in relative.parts)
        ):
            continue
        if path.is_symlink():
            raise PublishError(
                f"run directory {run_dir}: {relative.as_posix()} is a symbolic link; links are "
                "never published (nothing was uploaded)"
            )
        if path.is_file():
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


def _check_same_run(published: Manifest, objects: Mapping[str, dict], run_uri: str) -> None:
    stored = {key: entry.model_dump() for key, entry in published.objects.items()}
    differing = sorted(
        key for key in stored.keys() | objects.keys() if stored.get(key) != objects.get(key)
    )
    if differing:
        raise ConflictError(
            f"run {run_uri} is already published with different content ({len(differing)} "
            f"object(s) differ, e.g. {differing[0]}); publish it under a new run id"
        )


def _write_manifest(run_store: ArtifactStore, manifest: Manifest) -> tuple[Manifest, str]:
    """Write the manifest create-only, read it back; the stored manifest and its SHA-256."""
    data = document_bytes(manifest)
    try:
        run_store.put(layout.MANIFEST, data, if_none_match=True)
        written = True
    except ConflictError:
        written = False  # a concurrent publisher of this run id won; fine if it is identical
    stored = read_manifest(run_store)
    if stored is None or (written and stored[1] != digest(data)):
        raise IntegrityError(f"{run_store.key_uri(layout.MANIFEST)} does not read back as written")
    _check_same_run(stored[0], manifest.model_dump()["objects"], run_store.uri)
    return stored


def read_latest(store: ArtifactStore) -> tuple[Latest | None, Blob | None]:
    """latest.json as a model (None when absent or damaged: a damaged one is replaced, with a
    warning) and the blob to compare-and-swap against."""
    blob = store.get(layout.LATEST)
    if blob is None:
        return None, None
    try:
        return parse_document(Latest, blob.data, store.key_uri(layout.LATEST)), blob
    except IntegrityError as exc:
        step_logger(__name__).warning("%s; the next promotion replaces it", exc)
        return None, blob


def promote_latest(store: ArtifactStore, manifest: Manifest, manifest_sha256: str) -> Promotion:
    """Point latest.json at this run unless a run published after it is already there.

    Compare-and-swap: the write succeeds only if latest.json is still the version read, so
    concurrent publishers never lose an update; the loser re-reads and decides again.
    """
    for attempt in range(LATEST_ATTEMPTS):
        current, blob = read_latest(store)
        refusal = promotion_refusal(manifest, current)
        if refusal is not None:
            return Promotion(False, refusal)
        if current is not None and current.manifest_sha256 == manifest_sha256:
            return Promotion(False, "latest.json already points at it")
        sequence = max(current.sequence if current else 0, manifest.published_after) + 1
        document = latest_record(manifest, manifest_sha256, sequence, utc_iso(time.time()))
        try:
            store.put(
                layout.LATEST,
                document_bytes(document),
                if_match=blob.etag if blob else None,
                if_none_match=blob is None,
            )
            return Promotion(True, f"latest.json points at it (promotion {sequence})")
        except ConflictError:
            time.sleep(random.uniform(0, 0.05 * 2**attempt))  # jitter: let the other one finish
    raise StoreError(
        f"{store.key_uri(layout.LATEST)}: gave up after {LATEST_ATTEMPTS} attempts, each lost to a "
        "concurrent publisher"
    )


def read_restarts(run_dir: Path) -> list[dict]:
    """The training's restarts recorded in the run directory (none when the file is absent)."""
    try:
        data = read_document_file(run_dir / layout.TRAIN_RESTARTS, MAX_DOCUMENT_BYTES)
    except FileNotFoundError:
        return []
    except UnsafeFileError as exc:
        raise PublishError(str(exc)) from None
    return parse_restarts(data.decode(errors="replace"))


def _verify_stored(run_store: ArtifactStore, manifest: Manifest) -> None:
    """Re-hash the run's stored objects: promote only what a reader would accept."""
    expected = manifest.expected()
    problems = object_problems(expected, run_store.rehash_many(sorted(expected)))
    if problems:
        raise IntegrityError(
            f"run {run_store.uri} does not match its manifest, so it was not promoted: "
            + "; ".join(problems[:5])
        )


def _no_link_sha256(run_dir: Path, key: str) -> str:
    try:
        with open_no_links(run_dir, key) as source:
            return file_sha256(source)
    except UnsafeFileError as exc:  # replaced by a link after the scan
        raise PublishError(f"{exc} (nothing was uploaded)") from None


def _local_files(run_dir: Path) -> tuple[dict[str, tuple[Path, str]], dict[str, dict]]:
    files = scan_run_dir(run_dir)
    local = {key: (path, _no_link_sha256(run_dir, key)) for key, path in files.items()}
    objects = {
        key: {"size": path.stat().st_size, "sha256": sha} for key, (path, sha) in local.items()
    }
    return local, objects


def publish_run(
    store: ArtifactStore, run_dir: Path, dataset_record: dict, config: PipelineConfig
) -> PublishResult:
    """Publish the local run directory `run_dir` as run `config.run_id` of `store`."""
    config.run_dir()  # raises a clear ConfigError when the flow has not set a run id
    local, objects = _local_files(run_dir)
    try:
        metrics = read_metrics(str(run_dir / layout.REPORT_DIR))
    except EvaluationError as exc:
        raise PublishError(str(exc)) from None
    store.ensure_writable()
    run_store = store.child(layout.run_key(config.run_id))
    published = read_manifest(run_store)
    if published is not None:
        _check_same_run(published[0], objects, run_store.uri)  # before touching any object
        uploaded = run_store.sync(local)  # the manifest's bytes: repairs damage, mixes nothing
    else:
        # Create-only: a concurrent publisher of this run id with other bytes makes one of
        # the two fail here, instead of both mixing their objects under one manifest.
        uploaded = run_store.sync(local, create_only=True)
        manifest = build_manifest(
            run_id=config.run_id,
            objects=objects,
            created_at=utc_iso(min(path.stat().st_mtime for path, _ in local.values())),
            published_at=utc_iso(time.time()),
            published_after=_promotions_so_far(store),
            dataset=dataset_record,
            config=config.model_dump(mode="json"),
            metrics=metrics,
            code_revision=code_revision(),
            flow_run_id=flow_run_id(),
            restarts=read_restarts(run_dir),
        )
        published = _write_manifest(run_store, manifest)
    _verify_stored(run_store, published[0])
    promotion = promote_latest(store, *published)
    return PublishResult(run_store.uri, uploaded, promotion.promoted, promotion.reason)


def _promotions_so_far(store: ArtifactStore) -> int:
    current, _ = read_latest(store)
    return current.sequence if current else 0


def publish(config: PipelineConfig) -> None:
    """The flow's publish step: `config.run_dir()` as run `config.run_id` of the store."""
    store = open_store(config.artifact_store, **config.store_options())
    run_dir = local_run(config.run_dir(), str(config.run_dir()))  # a pulled run: its manifest
    result = publish_run(store, run_dir, read_record(config.data_uri()), config)
    step_logger(__name__).info(publish_line(config.run_id, result))


def publish_line(run_id: str, result: PublishResult) -> str:
    """The publish step's log line: what was sent, and what latest.json does, said once."""
    promotion = result.promotion
    if not result.promoted and not promotion.startswith(layout.LATEST):
        promotion = f"latest.json unchanged: {promotion}"
    return (
        f"published run {run_id} to {result.run_uri} ({len(result.uploaded)} object(s) "
        f"uploaded); {promotion}"
    )
