"""Artifact stores: one small interface over a local directory (file://) and S3 (s3://).

Writes are atomic on both backends (S3 objects appear whole; files go through the one atomic
write of `pipeline.base.files`: a hidden temp file, fsynced, renamed, its directory fsynced),
and both support the two conditional writes the publish step needs: if-none-match (create
only) and if-match (replace only the version that was read).
A store is built from its URI and what it needs (an S3 endpoint, whether it may create its
bucket), never from the pipeline's whole configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.base.layout import MANIFEST
from pipeline.base.store.base import (
    ArtifactStore,
    Blob,
    ConflictError,
    IntegrityError,
    ObjectInfo,
    StoreError,
    content_type,
    safe_relative,
)
from pipeline.base.store.documents import (
    Manifest,
    digest,
    document_bytes,
    object_problems,
    parse_document,
)
from pipeline.base.store.file import FileStore
from pipeline.base.uris import check_store_uri, local_path, to_uri

__all__ = [
    "ArtifactStore",
    "Blob",
    "ConflictError",
    "FileStore",
    "IntegrityError",
    "ObjectInfo",
    "StoreError",
    "content_type",
    "download_run",
    "materialize",
    "open_store",
    "read_json",
    "read_manifest",
    "local_run",
    "verify_local_run",
    "safe_relative",
]


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    create_bucket: bool = False,
    transfer: object | None = None,
    timeouts: tuple[float, float, int | None, float] | None = None,
) -> ArtifactStore:
    """The store at `uri`: file://PATH (file://rel is relative to the cwd) or s3://BUCKET/PREFIX.

    `endpoint_url`: an S3-compatible server (else boto3's own configuration decides);
    `create_bucket`: whether `ensure_writable` may create a missing bucket; `transfer`: a boto3
    TransferConfig tuning multipart sizes and concurrency; `timeouts`: (connect seconds, read
    seconds, attempts) of every S3 request (`PipelineConfig.s3_timeouts`).
    """
    scheme = check_store_uri(uri, StoreError)
    if scheme == "file":
        return FileStore(local_path(uri))
    # Imported here: boto3 costs a second to import, and file:// users never need it.
    from pipeline.base.store.s3 import S3Store

    parsed = urlparse(uri)
    return S3Store.connect(
        parsed.netloc, unquote(parsed.path), endpoint_url, create_bucket, transfer, timeouts
    )


def read_json(store: ArtifactStore, key: str) -> dict | None:
    """A JSON object stored under `key`, None when absent."""
    blob = store.get(key)
    if blob is None:
        return None
    try:
        return json.loads(blob.data)
    except ValueError as exc:
        raise IntegrityError(f"{store.key_uri(key)}: not valid JSON ({exc})") from exc


def read_manifest(run_store: ArtifactStore) -> tuple[Manifest, str] | None:
    """A run's validated manifest and the SHA-256 of its bytes; None when it has none."""
    blob = run_store.get(MANIFEST)
    if blob is None:
        return None
    return parse_document(Manifest, blob.data, run_store.key_uri(MANIFEST)), digest(blob.data)


def _unfinished(uri: str) -> StoreError:
    return StoreError(
        f"{uri} has no {MANIFEST}: it is not a published run (or its publish did not "
        "finish), and readers use only published runs"
    )


def materialize(
    uri: str,
    dest: Path,
    endpoint_url: str | None = None,
    *,
    published: bool = False,
    timeouts: tuple[float, float, int | None, float] | None = None,
) -> Path:
    """A run directory on local disk: PATH, file://PATH or s3://BUCKET/PREFIX/runs/RUN_ID.

    Local runs are returned as they are (verified against their manifest when they have one).
    Remote ones are downloaded into `dest`, verifying every object against the run's manifest.
    `published`: the run must have a manifest (a reader's rule: a run without one is
    unfinished); else a remote run without one is copied as it is (the flow's own run).
    """
    if "://" not in uri:
        uri = to_uri(uri, follow_links=False)
    store = open_store(uri, endpoint_url=endpoint_url, timeouts=timeouts)
    local = store.local_root()
    if local is not None:
        return local_run(local, uri, published=published)
    found = read_manifest(store)
    if found is None:
        keys = store.list_keys()
        if not keys:
            raise StoreError(f"{uri} holds no objects; expected a run, e.g. s3://BUCKET/runs/ID")
        if published:
            raise _unfinished(uri)
        # No manifest (the flow's own unpublished run): only the transfer's checksums apply.
        return store.fetch(dict.fromkeys(keys), dest)
    return download_run(store, found[0], dest)


def local_run(run_dir: Path, uri: str, *, published: bool = False) -> Path:
    """A run directory on this machine, which must exist, verified (`verify_local_run`)."""
    if not run_dir.is_dir():
        raise StoreError(f"run directory {uri} does not exist")
    return verify_local_run(run_dir, uri, published=published)


def verify_local_run(run_dir: Path, uri: str, *, published: bool = False) -> Path:
    """`run_dir` once every object its manifest lists has the recorded size and SHA-256.

    `published`: it must have a manifest (a reader's rule for a run of a store).
    """
    local = FileStore(run_dir)
    found = read_manifest(local)
    if found is None:
        if published:
            raise _unfinished(uri)
        return run_dir  # a work directory the flow is filling: not published yet
    expected = found[0].expected()
    problems = object_problems(expected, local.rehash_many(sorted(expected)))
    if problems:
        raise IntegrityError(f"{uri} does not match its manifest: {'; '.join(problems)}")
    return run_dir


def download_run(run_store: ArtifactStore, manifest: Manifest, dest: Path) -> Path:
    """Every object of a published run into `dest`, checksums verified, plus its manifest."""
    run_store.fetch(manifest.expected(), dest)
    FileStore(dest).put(MANIFEST, document_bytes(manifest))
    return dest
