"""The dataset cache: verified, decompressed IDX files, their lineage record, and loading them.

The cache holds the *decompressed* IDX files (`train-images-idx3-ubyte`, ...), because the pinned
SHA-256 digests are of the decompressed content (Debian's copies are re-gzipped) and because
inflating 30 MB of gzip costs several times more than hashing 55 MB (bench/dataset_speed.py).

Safety rests on one rule: bytes are used only after their SHA-256 matched the pin. A warm cache
is re-hashed by `prepare_dataset` (a damaged file is fetched again), and `load_dataset` hashes
the very bytes it parses. Size and mtime are never trusted for correctness: `cache_key` uses
them only to let Prefect skip the step, and the load still verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.files import (
    MAX_DOCUMENT_BYTES,
    UnsafeFileError,
    atomic_write,
    file_sha256,
    read_document_file,
)
from pipeline.base.logs import step_logger
from pipeline.base.uris import local_path, to_uri
from tasks.dataset.download import fetch_from_mirrors
from tasks.dataset.idx import (
    FILES,
    CorruptDataError,
    DataFile,
    DatasetError,
    FashionMNIST,
    parse_idx,
)

UNKNOWN_MIRROR = "unknown (already in the cache)"
MISSING = "is missing"


@contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's lock file: one process fills the cache, others wait and then reuse it."""
    lock = FileLock(cache / layout.DATASET_LOCK)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            step_logger(__name__).info(
                "%s: another process is filling this cache; waiting for its lock", cache
            )
            lock.acquire()
    except OSError as exc:
        raise DatasetError(
            f"dataset cache {cache}: cannot take its lock file {layout.DATASET_LOCK} ({exc}); "
            "the cache directory must be writable"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _cache_problem(path: Path, spec: DataFile) -> str | None:
    """Why the cached copy of `spec` cannot be used, or None when its SHA-256 matches the pin."""
    try:
        size = path.stat().st_size
        if size != spec.nbytes:
            return f"has {size} bytes, expected {spec.nbytes}"
        digest = file_sha256(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"is unreadable ({exc.strerror})"
    return None if digest == spec.sha256 else f"has SHA-256 {digest[:16]}…, not the pinned one"


def _read_record_file(cache: Path) -> dict:
    try:
        return json.loads(read_document_file(cache / layout.DATASET_RECORD, MAX_DOCUMENT_BYTES))
    except (OSError, ValueError, UnsafeFileError):
        return {}  # no (readable) record yet: it is rebuilt from the verified files


def cache_key(config: PipelineConfig) -> str:
    """The Prefect cache key of the dataset step for this config.

    Derived from the cache location, the pinned digests and a cheap signature (size, mtime) of
    every cached file and of the record: a second run reuses a warm cache without re-hashing,
    while a touched, replaced or deleted file changes the key, so the step runs and re-checks.
    An incomplete cache gets a key never seen before: a run that filled it must not be reused
    once it is gone again.
    """
    cache = local_path(config.data_uri())
    parts = [str(cache), *(spec.sha256 for spec in FILES.values())]
    for name in [*(spec.cached_name for spec in FILES.values()), layout.DATASET_RECORD]:
        try:
            stat = (cache / name).stat()
        except OSError:
            return f"dataset-incomplete-{uuid.uuid4().hex}"
        parts.append(f"{name} {stat.st_size} {stat.st_mtime_ns}")
    return "dataset-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def prepare_dataset(config: PipelineConfig) -> str:
    """Make the dataset cache complete and verified; return its file:// URI.

    Every cached file is hashed; a missing or damaged one is fetched from the mirrors in order
    (unless `config.offline`, where that is an error). One process at a time fills a cache (lock
    file); the others wait, then find it warm. The record (cache, per-file SHA-256, mirror) is
    rewritten only when it changes, so a warm cache keeps the mirrors that originally served it.
    """
    cache = local_path(config.data_uri())
    if config.offline and not cache.is_dir():
        raise DatasetError(
            f"offline mode: dataset cache {cache} does not exist; run once without --offline "
            "to download the data set"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"dataset cache {cache}: cannot create it ({exc})") from exc
    log = step_logger(__name__)
    with _cache_lock(cache):
        for stale in cache.glob(f".*{layout.DATASET_PART_SUFFIX}"):  # left by a killed process
            stale.unlink(missing_ok=True)
        old_record = _read_record_file(cache)
        problems = {
            spec.name: problem
            for spec in FILES.values()
            if (problem := _cache_problem(cache / spec.cached_name, spec)) is not None
        }
        if config.offline and problems:
            listed = "; ".join(f"{name} {problem}" for name, problem in problems.items())
            raise DatasetError(
                f"offline mode: dataset cache {cache} is not usable: {listed}; "
                "run without --offline to fetch it"
            )
        files = {}
        unreachable: dict[str, str] = {}
        for spec in FILES.values():
            if spec.name in problems:
                if problems[spec.name] != MISSING:
                    log.warning(
                        "%s: cached copy %s; fetching it again", spec.name, problems[spec.name]
                    )
                mirror = fetch_from_mirrors(spec, cache / spec.cached_name, config, unreachable)
                files[spec.name] = {"sha256": spec.sha256, "mirror": mirror}
            else:
                kept = old_record.get("files", {}).get(spec.name, {})
                files[spec.name] = {
                    "sha256": spec.sha256,
                    "mirror": kept.get("mirror", UNKNOWN_MIRROR),
                }
        record = {"cache": str(cache), "files": files}
        if record != old_record:
            atomic_write(cache / layout.DATASET_RECORD, json.dumps(record, indent=2))
    return to_uri(cache)


def _load_verified(path: Path, spec: DataFile) -> np.ndarray:
    """Read a cached IDX file once; hash and parse those same bytes."""
    try:
        with path.open("rb") as file:
            raw = bytearray(os.fstat(file.fileno()).st_size)
            file.readinto(raw)
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot read ({exc.strerror}); run `pipeline dataset` to fetch it"
        ) from exc
    array = parse_idx(raw, str(path), spec.shape)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise CorruptDataError(
            f"{path}: SHA-256 {digest[:16]}… does not match the pinned {spec.sha256[:16]}…; "
            "run `pipeline dataset` to fetch it again"
        )
    return array


def load_dataset(data_uri: str) -> FashionMNIST:
    """Load the four IDX files of a dataset cache as uint8 arrays, verifying each digest."""
    cache = local_path(data_uri)
    return FashionMNIST(
        **{key: _load_verified(cache / spec.cached_name, spec) for key, spec in FILES.items()}
    )


def read_record(data_uri: str) -> dict:
    """The lineage record of a dataset cache: its location, and per file the SHA-256 and the
    mirror that served it."""
    path = local_path(data_uri) / layout.DATASET_RECORD
    try:
        return json.loads(read_document_file(path, MAX_DOCUMENT_BYTES))
    except UnsafeFileError as exc:
        raise DatasetError(f"cannot read the dataset record: {exc}") from None
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot read the dataset record ({exc.strerror}); run `pipeline dataset`"
        ) from exc
    except ValueError as exc:
        raise DatasetError(f"{path}: not a valid dataset record ({exc})") from exc
