"""The s3:// store: objects under s3://BUCKET/PREFIX, moved with boto3's transfer manager.

Plain boto3, configured as AWS users configure it (AWS_* environment variables, AWS_PROFILE,
~/.aws/config and credentials) plus an explicit endpoint for S3-compatible servers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
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

from pipeline.base.files import MAX_DOCUMENT_BYTES
from pipeline.base.store.base import (
    SHA256_METADATA,
    ArtifactStore,
    Blob,
    ConflictError,
    ObjectInfo,
    R,
    StoreError,
    T,
    content_type,
    safe_relative,
    too_large,
)

# (connect s, read s, attempts, deadline s of a whole store call): PipelineConfig's defaults,
# for stores opened without a config.
DEFAULT_TIMEOUTS: tuple[float, float, int | None, float] = (5.0, 30.0, None, 60.0)
_HASH_CHUNK = 1 << 20
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes

# When the store call running in this context must be over (time.monotonic()); set by
# S3Store._errors, read by the before-send hook before every attempt of every request.
_CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "s3_call_deadline", default=None
)


class _DeadlinePassed(Exception):
    """Raised by the before-send hook; botocore's retries never retry it (not transient)."""


def _bound_attempt(read_timeout: float, request: object, **_: object) -> None:
    """Before each attempt: none once the call's deadline passed, else wait no longer for the
    endpoint's bytes than the time the call has left (botocore's per-request read timeout)."""
    deadline = _CALL_DEADLINE.get()
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _DeadlinePassed()
    request.context["read_timeout"] = min(read_timeout, remaining)


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
        deadline: float = DEFAULT_TIMEOUTS[3],
    ) -> None:
        self._session = session
        self._deadline = deadline
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
        endpoint_url: str | None = None,
        create_bucket: bool = False,
        transfer: TransferConfig | None = None,
        timeouts: tuple[float, float, int | None, float] | None = None,
    ) -> S3Store:
        """`timeouts`: (connect s, read s, attempts; None: boto3's own, AWS_MAX_ATTEMPTS or 3,
        and the deadline s of a whole store call, every attempt and backoff included);
        botocore's own 60 s reads would let a hung endpoint hold every call for minutes."""
        transfer = transfer or TransferConfig()
        connect_timeout, read_timeout, attempts, deadline = timeouts or DEFAULT_TIMEOUTS
        session = boto3.Session()  # AWS_PROFILE, AWS_* variables, ~/.aws/config + credentials
        endpoint = endpoint_url or _configured_endpoint_url(session)
        botocore_config = Config(
            # "standard" retries connection errors, timeouts, throttling and 5xx with backoff;
            # the attempts and timeouts are the pipeline's (s3_* settings), one place for all.
            retries={"mode": "standard"}
            if attempts is None
            else {"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, transfer.max_concurrency),
            # S3-compatible servers rarely resolve BUCKET.host names: address them by path.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        client = session.client("s3", endpoint_url=endpoint, config=botocore_config)
        client.meta.events.register(
            "before-send.s3", functools.partial(_bound_attempt, read_timeout)
        )
        return cls(session, client, bucket, prefix, transfer, create_bucket, deadline)

    def child(self, prefix: str) -> S3Store:
        return S3Store(
            self._session,
            self._client,
            self.bucket,
            self._key(str(safe_relative(prefix))),
            self._transfer,
            self._create_bucket,
            self._deadline,
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
        """One store call: its deadline (unless an outer call's applies), and boto3's
        exceptions as one-line StoreErrors (never showing the secret)."""
        target = self.key_uri(key) if key else self.uri
        token = None
        if _CALL_DEADLINE.get() is None:
            token = _CALL_DEADLINE.set(time.monotonic() + self._deadline)
        try:
            yield
        except _DeadlinePassed:
            raise StoreError(
                f"cannot reach S3 endpoint {self.endpoint} to {action} {target}: no answer "
                f"within the {self._deadline:g} s deadline of a store call (--s3-call-deadline)"
            ) from None
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
        finally:
            if token is not None:
                _CALL_DEADLINE.reset(token)

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

    def get(self, key: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Blob | None:
        with self._errors("read", key):
            response = self._get_object(key)
            if response is None:
                return None
            with contextlib.closing(response["Body"]) as body:
                # Streamed, never whole: the size is checked before a byte is read, and the
                # read stops one byte past the bound whatever Content-Length claimed.
                size = response.get("ContentLength")
                if size is not None and size > max_bytes:
                    raise too_large(self.key_uri(key), size, max_bytes)
                data = body.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise too_large(self.key_uri(key), None, max_bytes)
            return Blob(data, response["ETag"])

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
                ContentType=content_type(key),
                **conditions,
            )

    @property
    def _single_put(self) -> int:
        return self._transfer.multipart_threshold

    def _put_file_if_absent(self, item: tuple[str, tuple[Path, str]]) -> bool:
        """One create-only PUT (the transfer manager cannot send If-None-Match); False: lost."""
        key, (path, digest) = item
        try:
            with self._errors("upload to", key), path.open("rb") as body:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=body,
                    IfNoneMatch="*",
                    ChecksumAlgorithm="SHA256",
                    Metadata={SHA256_METADATA: digest},
                    ContentType=content_type(key),
                )
        except ConflictError:
            return False
        return True

    def upload(self, files: Mapping[str, tuple[Path, str]], *, create_only: bool = False) -> None:
        if not files:
            return
        if create_only:
            # The transfer manager cannot send If-None-Match: single PUTs for what fits one.
            # A larger (multipart) object was absent when `sync` looked; a writer racing it in
            # between is caught by the publish step's re-hash before promotion.
            small = {k: v for k, v in files.items() if v[0].stat().st_size <= self._single_put}
            created = self._map(self._put_file_if_absent, list(small.items()))
            lost = [key for key, ok in zip(small, created, strict=True) if not ok]
            files = {k: v for k, v in files.items() if k not in small}
            self.upload(files)
            if lost:
                raise ConflictError(f"{self.key_uri(lost[0])} (and {len(lost) - 1} more) exist")
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
                        "ContentType": content_type(key),
                    },
                )
                for key, (path, digest) in files.items()
            ]
            for future in futures:
                future.result()

    def delete(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with self._errors("delete from"):
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreError(
                    f"cannot delete s3://{self.bucket}/{first.get('Key', '?')} at {self.endpoint}: "
                    f"{first.get('Code', '')} {first.get('Message', '')} (and "
                    f"{len(errors) - 1} more)"
                )

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
