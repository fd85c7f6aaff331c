"""Artifact stores: one small interface over a local directory (file://) and S3 (s3://).

Writes are atomic on both backends (S3 objects appear whole; files are written to a hidden
temp file and renamed), and both support the two conditional writes the publish step needs:
if-none-match (create only) and if-match (replace only the version that was read).
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
    sha256_file,
)
from pipeline.base.store.file import FileStore
from pipeline.base.uris import check_store_uri, local_path

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
    "safe_relative",
    "sha256_file",
]


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    create_bucket: bool = False,
    transfer: object | None = None,
) -> ArtifactStore:
    """The store at `uri`: file://PATH (file://rel is relative to the cwd) or s3://BUCKET/PREFIX.

    `endpoint_url`: an S3-compatible server (else boto3's own configuration decides);
    `create_bucket`: whether `ensure_writable` may create a missing bucket; `transfer`: a boto3
    TransferConfig tuning multipart sizes and concurrency.
    """
    scheme = check_store_uri(uri, StoreError)
    if scheme == "file":
        return FileStore(local_path(uri))
    # Imported here: boto3 costs a second to import, and file:// users never need it.
    from pipeline.base.store.s3 import S3Store

    parsed = urlparse(uri)
    return S3Store.connect(
        parsed.netloc, unquote(parsed.path), endpoint_url, create_bucket, transfer
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


def materialize(uri: str, dest: Path, endpoint_url: str | None = None) -> Path:
    """A run directory on local disk: PATH, file://PATH or s3://BUCKET/PREFIX/runs/RUN_ID.

    Local runs are returned as they are. Remote ones are downloaded into `dest`, verifying
    every object against the run's manifest when it has one.
    """
    if "://" not in uri:
        uri = Path(uri).expanduser().absolute().as_uri()
    store = open_store(uri, endpoint_url=endpoint_url)
    local = store.local_root()
    if local is not None:
        if not local.is_dir():
            raise StoreError(f"run directory {uri} does not exist")
        return local
    manifest = read_json(store, MANIFEST)
    if manifest is None:
        keys = store.list_keys()
        if not keys:
            raise StoreError(f"{uri} holds no objects; expected a run, e.g. s3://BUCKET/runs/ID")
        # No manifest (an unfinished publish): only the transfer's own checksums apply.
        return store.fetch(dict.fromkeys(keys), dest)
    return download_run(store, manifest, dest)


def download_run(run_store: ArtifactStore, manifest: dict, dest: Path) -> Path:
    """Every object of a published run into `dest`, checksums verified, plus its manifest."""
    expected = {
        key: ObjectInfo(entry["size"], entry["sha256"])
        for key, entry in manifest["objects"].items()
    }
    run_store.fetch(expected, dest)
    FileStore(dest).put(MANIFEST, json.dumps(manifest, indent=2).encode())
    return dest
