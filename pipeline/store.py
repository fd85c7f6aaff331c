"""Artifact stores: one small interface over a local directory (file://) and S3 (s3://).

Both hold the same layout (see README): `runs/<run-id>/...` with `manifest.json` written last,
and `latest.json` at the root. A store is rooted at a URI; `child("runs/ID")` is the store of
one run, so a run directory, a whole store and a pulled copy are handled alike.

Writes are atomic on both backends (S3 objects appear whole; files are written to a hidden
temp file and renamed), and both support the two conditional writes the publish step needs:
if-none-match (create only) and if-match (replace only the version that was read).

The S3 backend is plain boto3, configured as AWS users configure it (AWS_* environment
variables, AWS_PROFILE, ~/.aws/config and credentials) plus `config.s3_endpoint_url`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple, TypeVar
from urllib.parse import unquote, urlparse

import boto3
import filelock
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.subscribers import BaseSubscriber

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

RUNS = "runs"
MANIFEST = "manifest.json"
LATEST = "latest.json"
SHA256_METADATA = "sha256"  # our whole-file digest: multipart S3 checksums are per part
CONNECT_TIMEOUT_S = 5  # botocore's default of 60 s per attempt hides a dead endpoint for minutes
LOCK_TIMEOUT_S = 60
_HASH_CHUNK = 1 << 20

T = TypeVar("T")
R = TypeVar("R")


class StoreError(PipelineError):
    """An artifact store cannot be read or written; the message names the URI and the cause."""


class ConflictError(StoreError):
    """A conditional write lost: the object exists, or changed since it was read."""


class IntegrityError(StoreError):
    """Stored bytes do not match the checksum they were published with."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object: its size and whole-file SHA-256 (hex)."""

    size: int
    sha256: str | None


class Blob(NamedTuple):
    """A small object's bytes and the version tag to make a conditional write against."""

    data: bytes
    etag: str


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _temp_path(path: Path) -> Path:
    """A hidden, unique sibling of `path` to write into before renaming it into place."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def _safe_relative(key: str) -> PurePosixPath:
    # Keys come from manifests, which a store can hand us: never let one escape its directory.
    relative = PurePosixPath(key)
    if not key or relative.is_absolute() or ".." in relative.parts:
        raise IntegrityError(f"object key {key!r} is not a plain relative path")
    return relative


class ArtifactStore(ABC):
    """A tree of objects under a URI. Keys are relative, '/'-separated paths."""

    uri: str

    def key_uri(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def local_root(self) -> Path | None:
        """The directory holding the objects when they are already on local disk."""
        return None

    @abstractmethod
    def child(self, prefix: str) -> ArtifactStore:
        """The store rooted at `prefix` below this one."""

    @abstractmethod
    def ensure_writable(self) -> None:
        """Create the root (directory or bucket) if allowed; fail clearly if it cannot be."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-directories of `prefix`."""

    @abstractmethod
    def list_keys(self) -> list[str]:
        """Every object key below the root."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and recorded SHA-256 of an object (cheap), None when it does not exist."""

    @abstractmethod
    def rehash(self, key: str) -> ObjectInfo | None:
        """Size and SHA-256 of the bytes actually stored (reads them), None when missing."""

    @abstractmethod
    def get(self, key: str) -> Blob | None:
        """A small object's bytes and version tag, None when it does not exist."""

    @abstractmethod
    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> None:
        """Write a small object atomically; raise ConflictError when the condition fails.

        if_none_match: only if no object exists under `key`; if_match: only if the object
        still has the version tag `if_match` (from `get`).
        """

    @abstractmethod
    def upload(self, files: Mapping[str, tuple[Path, str]]) -> None:
        """Store local files: key -> (path, its SHA-256 hex)."""

    @abstractmethod
    def _download(self, targets: Mapping[str, tuple[Path, ObjectInfo | None]]) -> None:
        """Copy objects as they are: key -> (local path, what the object should be, if known)."""

    def _map(self, func: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [func(item) for item in items]

    def stat_many(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        return dict(zip(keys, self._map(self.stat, keys), strict=True))

    def rehash_many(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        return dict(zip(keys, self._map(self.rehash, keys), strict=True))

    def sync(self, files: Mapping[str, tuple[Path, str]]) -> list[str]:
        """Upload the files whose stored copy is missing or differs; return their keys.

        Idempotent: a file whose size and SHA-256 already match is not sent again.
        """
        stored = self.stat_many(list(files))
        changed = {
            key: (path, digest)
            for key, (path, digest) in files.items()
            if stored[key] != ObjectInfo(path.stat().st_size, digest)
        }
        self.upload(changed)
        return sorted(changed)

    def fetch(self, expected: Mapping[str, ObjectInfo | None], dest: Path) -> Path:
        """Download objects into `dest`: key -> the size and SHA-256 they must have (None: any).

        Each object lands under a hidden temp name and is renamed into place only once it
        matched, so `dest` never holds a file with unverified bytes.
        """
        staged: dict[str, Path] = {}
        try:
            for key in expected:
                final = dest / _safe_relative(key)
                final.parent.mkdir(parents=True, exist_ok=True)
                staged[key] = _temp_path(final)
            self._download({key: (part, expected[key]) for key, part in staged.items()})
            for key, part in staged.items():
                want = expected[key]
                got = (
                    ObjectInfo(part.stat().st_size, sha256_file(part)) if want is not None else None
                )
                if got != want:
                    raise IntegrityError(
                        f"{self.key_uri(key)}: stored bytes have size {got.size} and SHA-256 "
                        f"{got.sha256}, but the manifest says {want.size} and {want.sha256}"
                    )
                os.replace(part, dest / _safe_relative(key))
        except OSError as exc:
            raise StoreError(f"cannot write into {dest}: {exc.strerror or exc}") from exc
        finally:
            for part in staged.values():
                part.unlink(missing_ok=True)
        return dest


# --- file:// ----------------------------------------------------------------------------------


class FileStore(ArtifactStore):
    """A directory tree. Names starting with '.' are the store's own temp and lock files."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.uri = self.root.as_uri()

    def local_root(self) -> Path:
        return self.root

    def child(self, prefix: str) -> FileStore:
        return FileStore(self.root / _safe_relative(prefix))

    def _path(self, key: str) -> Path:
        return self.root / _safe_relative(key)

    @contextlib.contextmanager
    def _os_errors(self, action: str, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(
                f"artifact store {self.uri}: cannot {action} {path}: {reason}"
            ) from exc

    @contextlib.contextmanager
    def _staged(self, path: Path) -> Iterator[Path]:
        """A hidden temp file next to `path`, removed unless the caller renamed it."""
        with self._os_errors("write", path):
            path.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_path(path)
        try:
            with self._os_errors("write", path):
                yield temp
        finally:
            temp.unlink(missing_ok=True)

    @staticmethod
    def _fsync(path: Path) -> None:
        # Rename is atomic for readers; fsync first so a power loss cannot leave an empty file.
        with path.open("rb+") as f:
            os.fsync(f.fileno())

    def _write(self, path: Path, data: bytes, create_only: bool = False) -> None:
        with self._staged(path) as temp:
            temp.write_bytes(data)
            self._fsync(temp)
            if not create_only:
                os.replace(temp, path)
                return
            try:
                os.link(temp, path)  # atomic create-if-absent: fails when `path` exists
            except FileExistsError:
                raise ConflictError(f"{path.as_uri()} already exists") from None

    def ensure_writable(self) -> None:
        with self._os_errors("create directory", self.root):
            self.root.mkdir(parents=True, exist_ok=True)

    def list_dirs(self, prefix: str) -> list[str]:
        parent = self._path(prefix)
        if not parent.is_dir():
            return []
        with self._os_errors("list", parent):
            return sorted(p.name for p in parent.iterdir() if p.is_dir())

    def list_keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        with self._os_errors("list", self.root):
            relative = (p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file())
            return sorted(
                r.as_posix() for r in relative if not any(part.startswith(".") for part in r.parts)
            )

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        with self._os_errors("read", path):
            if not path.is_file():
                return None
            return ObjectInfo(path.stat().st_size, sha256_file(path))

    rehash = stat  # a local file has no separately recorded digest

    def get(self, key: str) -> Blob | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"artifact store {self.uri}: cannot read {path}: {exc}") from exc
        return Blob(data, hashlib.sha256(data).hexdigest())

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> None:
        path = self._path(key)
        if if_match is None:
            self._write(path, data, create_only=if_none_match)
            return
        # if-match = compare and swap under a lock that every if-match writer of `path` takes.
        lock = filelock.FileLock(path.with_name(f".{path.name}.lock"), timeout=LOCK_TIMEOUT_S)
        try:
            with self._os_errors("lock", path), lock:
                current = self.get(key)
                if current is None or current.etag != if_match:
                    raise ConflictError(f"{path.as_uri()} changed since it was read")
                self._write(path, data)
        except filelock.Timeout as exc:
            raise StoreError(f"{lock.lock_file}: still locked after {LOCK_TIMEOUT_S} s") from exc

    def upload(self, files: Mapping[str, tuple[Path, str]]) -> None:
        for key, (source, _digest) in files.items():
            target = self._path(key)
            with self._staged(target) as temp:
                shutil.copyfile(source, temp)
                self._fsync(temp)
                os.replace(temp, target)

    def _download(self, targets: Mapping[str, tuple[Path, ObjectInfo | None]]) -> None:
        for key, (target, _expected) in targets.items():
            source = self._path(key)
            with self._os_errors("copy", source):
                shutil.copyfile(source, target)


# --- s3:// ------------------------------------------------------------------------------------

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class _KnownSize(BaseSubscriber):
    """Gives the transfer manager an object's size from the manifest: no HEAD request first."""

    def __init__(self, size: int) -> None:
        self._size = size

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self._size)


def _configured_endpoint_url(session: boto3.Session) -> str | None:
    """The endpoint boto3 itself would use from AWS_ENDPOINT_URL[_S3] or the profile, if any."""
    # botocore resolves these only while building a client; compare with one that ignores them.
    configured = session.client("s3").meta.endpoint_url
    ignoring = Config(ignore_configured_endpoint_urls=True)
    default = session.client("s3", config=ignoring).meta.endpoint_url
    return configured if configured != default else None


class S3Store(ArtifactStore):
    """Objects under s3://BUCKET/PREFIX, moved with boto3's transfer manager."""

    def __init__(
        self,
        session: boto3.Session,
        client: BaseClient,
        bucket: str,
        prefix: str,
        transfer: TransferConfig,
        create_bucket: bool,
    ) -> None:
        self._session = session
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._transfer = transfer
        self._create_bucket = create_bucket
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def connect(
        cls,
        bucket: str,
        prefix: str,
        config: PipelineConfig,
        transfer: TransferConfig | None = None,
    ) -> S3Store:
        transfer = transfer or TransferConfig()
        session = boto3.Session()  # AWS_PROFILE, AWS_* variables, ~/.aws/config + credentials
        endpoint = config.s3_endpoint_url or _configured_endpoint_url(session)
        botocore_config = Config(
            # "standard" retries connection errors, throttling and 5xx with backoff; the
            # number of attempts stays boto3's (3, or AWS_MAX_ATTEMPTS / max_attempts).
            retries={"mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_S,
            max_pool_connections=max(10, transfer.max_concurrency),
            # S3-compatible servers rarely resolve BUCKET.host names: address them by path.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        client = session.client("s3", endpoint_url=endpoint, config=botocore_config)
        return cls(session, client, bucket, prefix, transfer, config.create_bucket)

    def child(self, prefix: str) -> S3Store:
        return S3Store(
            self._session,
            self._client,
            self.bucket,
            self._key(str(_safe_relative(prefix))),
            self._transfer,
            self._create_bucket,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def endpoint(self) -> str:
        return self._client.meta.endpoint_url

    def _key_id(self) -> str | None:
        credentials = self._session.get_credentials()
        return credentials.access_key if credentials else None

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Turn boto3's exceptions into one-line StoreErrors (never showing the secret)."""
        target = self.key_uri(key) if key else self.uri
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ConflictError(f"{target}: conditional write lost ({code})") from exc
            if code == "NoSuchBucket":
                raise StoreError(self._missing_bucket_message()) from exc
            if status == 403 or code in _AUTH_CODES:
                raise StoreError(
                    f"S3 endpoint {self.endpoint} refused access key id {self._key_id()!r} "
                    f"({code or status}) to {action} {target}; check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
                ) from exc
            message = error.get("Message", "")
            raise StoreError(
                f"cannot {action} {target} at {self.endpoint}: {code} {message}".rstrip()
            ) from exc
        except (BotoConnectionError, HTTPClientError, RetriesExceededError) as exc:
            attempts = self._client.meta.config.retries.get("total_max_attempts", 3)
            raise StoreError(
                f"cannot reach S3 endpoint {self.endpoint} to {action} {target} "
                f"(gave up after {attempts} attempts): {exc}"
            ) from exc
        except NoCredentialsError as exc:
            raise StoreError(
                f"no S3 credentials to {action} {target}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"cannot {action} {target} at {self.endpoint}: {exc}") from exc

    def _missing_bucket_message(self) -> str:
        return (
            f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it, or allow "
            "the pipeline to (--create-bucket, PIPELINE_CREATE_BUCKET=true)"
        )

    def _map(self, func: Callable[[T], R], items: Sequence[T]) -> list[R]:
        # Small requests are latency-bound: issue them side by side (clients are thread-safe).
        with ThreadPoolExecutor(self._transfer.max_concurrency) as pool:
            return list(pool.map(func, items))

    def ensure_writable(self) -> None:
        with self._errors("check bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in _MISSING_CODES:
                    raise
            if not self._create_bucket:
                raise StoreError(self._missing_bucket_message())
            region = self._client.meta.region_name
            location = (
                {}
                if region in (None, "us-east-1")
                else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            )
            # A concurrent publisher may have created it meanwhile.
            with contextlib.suppress(self._client.exceptions.BucketAlreadyOwnedByYou):
                self._client.create_bucket(Bucket=self.bucket, **location)

    def _pages(self, **kwargs) -> Iterator[dict]:
        paginator = self._client.get_paginator("list_objects_v2")
        return iter(paginator.paginate(Bucket=self.bucket, **kwargs))

    def list_dirs(self, prefix: str) -> list[str]:
        start = self._key(prefix) + "/"
        with self._errors("list", prefix):
            return sorted(
                common["Prefix"][len(start) :].rstrip("/")
                for page in self._pages(Prefix=start, Delimiter="/")
                for common in page.get("CommonPrefixes", [])
            )

    def list_keys(self) -> list[str]:
        start = self._key("")
        with self._errors("list"):
            return sorted(
                item["Key"][len(start) :]
                for page in self._pages(Prefix=start)
                for item in page.get("Contents", [])
            )

    @staticmethod
    def _is_missing(exc: ClientError) -> bool:
        return exc.response.get("Error", {}).get("Code") in _MISSING_CODES

    def stat(self, key: str) -> ObjectInfo | None:
        with self._errors("read", key):
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if self._is_missing(exc):
                    return None
                raise
        return ObjectInfo(head["ContentLength"], head.get("Metadata", {}).get(SHA256_METADATA))

    def _get_object(self, key: str) -> dict | None:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._is_missing(exc):
                return None
            raise

    def rehash(self, key: str) -> ObjectInfo | None:
        with self._errors("read", key):
            response = self._get_object(key)
            if response is None:
                return None
            digest, size = hashlib.sha256(), 0
            for chunk in response["Body"].iter_chunks(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return ObjectInfo(size, digest.hexdigest())

    def get(self, key: str) -> Blob | None:
        with self._errors("read", key):
            response = self._get_object(key)
            if response is None:
                return None
            return Blob(response["Body"].read(), response["ETag"])

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> None:
        conditions = {}
        if if_match is not None:
            conditions["IfMatch"] = if_match
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        with self._errors("write", key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ChecksumAlgorithm="SHA256",
                Metadata={SHA256_METADATA: hashlib.sha256(data).hexdigest()},
                **conditions,
            )

    def upload(self, files: Mapping[str, tuple[Path, str]]) -> None:
        if not files:
            return
        with (
            self._errors("upload to"),
            create_transfer_manager(self._client, self._transfer) as manager,
        ):
            futures = [
                manager.upload(
                    str(path),
                    self.bucket,
                    self._key(key),
                    # The server checks each request's (or part's) SHA-256; the metadata keeps
                    # the whole-file digest, which a multipart checksum is not.
                    extra_args={
                        "ChecksumAlgorithm": "SHA256",
                        "Metadata": {SHA256_METADATA: digest},
                    },
                )
                for key, (path, digest) in files.items()
            ]
            for future in futures:
                future.result()

    def _download(self, targets: Mapping[str, tuple[Path, ObjectInfo | None]]) -> None:
        with (
            self._errors("download from"),
            create_transfer_manager(self._client, self._transfer) as manager,
        ):
            futures = [
                manager.download(
                    self.bucket,
                    self._key(key),
                    str(path),
                    subscribers=[_KnownSize(expected.size)] if expected else None,
                )
                for key, (path, expected) in targets.items()
            ]
            for future in futures:
                future.result()


# --- opening stores -------------------------------------------------------------------------


def open_store(
    uri: str, config: PipelineConfig, transfer: TransferConfig | None = None
) -> ArtifactStore:
    """The store at `uri`: file://PATH (file://rel is relative to the cwd) or s3://BUCKET/PREFIX.

    `transfer` tunes S3 multipart sizes and concurrency (default: boto3's TransferConfig()).
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        # file:///abs/path has an empty netloc; file://artifacts means ./artifacts.
        return FileStore(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"artifact store {uri!r} names no bucket; use s3://BUCKET/PREFIX")
        return S3Store.connect(parsed.netloc, unquote(parsed.path), config, transfer)
    raise StoreError(
        f"artifact store {uri!r} has unsupported scheme {parsed.scheme!r}; "
        "use file://PATH or s3://BUCKET/PREFIX"
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


def materialize(uri: str, dest: Path, config: PipelineConfig) -> Path:
    """A run directory on local disk: PATH, file://PATH or s3://BUCKET/PREFIX/runs/RUN_ID.

    Local runs are returned as they are. Remote ones are downloaded into `dest`, verifying
    every object against the run's manifest when it has one.
    """
    if "://" not in uri:
        uri = Path(uri).expanduser().absolute().as_uri()
    store = open_store(uri, config)
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
