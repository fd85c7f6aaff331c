"""The artifact store's interface: a tree of objects under a URI, with the two conditional writes
the publish step needs (create-only and compare-and-swap) and verified downloads.

Both backends (`file.py`, `s3.py`) hold the same layout (`pipeline.base.layout`). A store is
rooted at a URI; `child("runs/ID")` is the store of one run, so a run directory, a whole store
and a pulled copy are handled alike.
"""

from __future__ import annotations

import contextlib
import mimetypes
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple, TypeVar

from pipeline.base.errors import PipelineError
from pipeline.base.files import MAX_DOCUMENT_BYTES, atomic_file, file_sha256

SHA256_METADATA = "sha256"  # our whole-file digest: multipart S3 checksums are per part

T = TypeVar("T")
R = TypeVar("R")


class StoreError(PipelineError):
    """An artifact store cannot be read or written; the message names the URI and the cause."""


class ConflictError(StoreError):
    """A conditional write lost: the object exists, or changed since it was read."""


class IntegrityError(StoreError):
    """Stored bytes do not match the checksum they were published with."""


def too_large(uri: str, size: int | None, limit: int) -> IntegrityError:
    """The error for a document larger than it may be (read up to `limit` bytes, no further)."""
    told = f"{size} bytes" if size is not None else "more bytes"
    return IntegrityError(
        f"{uri}: {told}, more than the {limit} a document may have; it was not read"
    )


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object: its size and whole-file SHA-256 (hex)."""

    size: int
    sha256: str | None


class Blob(NamedTuple):
    """A small object's bytes and the version tag to make a conditional write against."""

    data: bytes
    etag: str


def check_key(key: str) -> str:
    """`key` if it is a plain relative '/'-separated path; IntegrityError otherwise.

    Keys come from manifests, which a store can hand us: never let one escape its directory,
    name the directory itself, or carry a NUL byte into a system call.
    """
    parts = key.split("/")
    if (
        not key
        or len(key) > 1024
        or "\x00" in key
        or "\\" in key
        or key.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise IntegrityError(f"object key {key!r} is not a plain relative path")
    return key


def safe_relative(key: str) -> PurePosixPath:
    return PurePosixPath(check_key(key))


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
    def get(self, key: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Blob | None:
        """A small object's bytes and version tag, None when it does not exist.

        Reads at most `max_bytes` (+1 to tell): a larger object is an IntegrityError naming
        it, raised before its bytes are held in memory.
        """

    @abstractmethod
    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> None:
        """Write a small object atomically; raise ConflictError when the condition fails.

        if_none_match: only if no object exists under `key`; if_match: only if the object
        still has the version tag `if_match` (from `get`).
        """

    @abstractmethod
    def upload(self, files: Mapping[str, tuple[Path, str]], *, create_only: bool = False) -> None:
        """Store local files: key -> (path, its SHA-256 hex).

        create_only: each object only if none exists under its key (ConflictError otherwise),
        so two writers of one key never replace each other's bytes.
        """

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> None:
        """Remove objects (absent ones are fine). Only for what a run replaces as it goes (old
        checkpoint epochs): everything a run publishes is create-only and never deleted."""

    @abstractmethod
    def _download(self, targets: Mapping[str, tuple[Path, ObjectInfo | None]]) -> None:
        """Copy objects as they are: key -> (local path, what the object should be, if known)."""

    def _map(self, func: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [func(item) for item in items]

    def stat_many(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        return dict(zip(keys, self._map(self.stat, keys), strict=True))

    def rehash_many(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        return dict(zip(keys, self._map(self.rehash, keys), strict=True))

    def sync(
        self, files: Mapping[str, tuple[Path, str]], *, create_only: bool = False
    ) -> list[str]:
        """Upload the files whose stored copy is missing or differs; return their keys.

        Idempotent: a file whose size and SHA-256 already match is not sent again.
        create_only: never replace a stored object; one that holds other bytes (another
        writer's) is a ConflictError, and so is losing the race to create one with other bytes.
        """
        stored = self.stat_many(list(files))
        wanted = {
            key: ObjectInfo(path.stat().st_size, digest) for key, (path, digest) in files.items()
        }
        changed = {key: files[key] for key in files if stored[key] != wanted[key]}
        if not create_only:
            self.upload(changed)
            return sorted(changed)
        taken = sorted(key for key in changed if stored[key] is not None)
        if taken:
            raise ConflictError(self._taken_message(taken))
        try:
            self.upload(changed, create_only=True)
        except ConflictError:
            # Lost a race to create: fine only if the winner stored the very same bytes.
            now = self.stat_many(sorted(changed))
            taken = sorted(key for key in changed if now[key] != wanted[key])
            if taken:
                raise ConflictError(self._taken_message(taken)) from None
        return sorted(changed)

    def _taken_message(self, keys: Sequence[str]) -> str:
        return (
            f"{self.key_uri(keys[0])} (and {len(keys) - 1} more) already holds other bytes: "
            "another publisher is writing this run id with other content, or an earlier "
            "publish of other content stopped half-way; publish under a new run id"
        )

    def fetch(self, expected: Mapping[str, ObjectInfo | None], dest: Path) -> Path:
        """Download objects into `dest`: key -> the size and SHA-256 they must have (None: any).

        Each object lands in a temp file of the one atomic write (pipeline.base.files), placed
        (fsynced, renamed, directory fsynced) only once every object matched, so `dest` never
        holds a file with unverified bytes.
        """
        try:
            with contextlib.ExitStack() as staging:
                staged = {
                    key: staging.enter_context(atomic_file(dest / safe_relative(key)))
                    for key in expected
                }
                self._download({key: (part, expected[key]) for key, part in staged.items()})
                for key, part in staged.items():
                    self._check_fetched(key, part, expected[key])
        except OSError as exc:
            raise StoreError(f"cannot write into {dest}: {exc.strerror or exc}") from exc
        return dest

    def _check_fetched(self, key: str, part: Path, want: ObjectInfo | None) -> None:
        got = ObjectInfo(part.stat().st_size, file_sha256(part)) if want is not None else None
        if got != want:
            raise IntegrityError(
                f"{self.key_uri(key)}: stored bytes have size {got.size} and SHA-256 "
                f"{got.sha256}, but the manifest says {want.size} and {want.sha256}"
            )


def content_type(key: str) -> str:
    """The media type an object is served with (so a browser shows a report, not a download)."""
    if key.endswith((".md", ".jsonl")):
        return "text/markdown; charset=utf-8" if key.endswith(".md") else "application/jsonl"
    guessed, _ = mimetypes.guess_type(key)
    return guessed or "application/octet-stream"
