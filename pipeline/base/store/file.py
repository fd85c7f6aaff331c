"""The file:// store: a directory tree. Names starting with '.' are its own temp and lock files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import filelock

from pipeline.base.files import (
    MAX_DOCUMENT_BYTES,
    TargetExists,
    UnsafeFileError,
    atomic_file,
    file_sha256,
    open_no_links,
    read_bounded,
)
from pipeline.base.store.base import (
    ArtifactStore,
    Blob,
    ConflictError,
    IntegrityError,
    ObjectInfo,
    StoreError,
    safe_relative,
    too_large,
)
from pipeline.base.uris import to_uri

LOCK_TIMEOUT_S = 60


class FileStore(ArtifactStore):
    """A directory tree. Names starting with '.' are the store's own temp and lock files."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.uri = to_uri(self.root, follow_links=False)

    def local_root(self) -> Path:
        return self.root

    def child(self, prefix: str) -> FileStore:
        return FileStore(self.root / safe_relative(prefix))

    def _path(self, key: str) -> Path:
        return self.root / safe_relative(key)

    @staticmethod
    def _uri_of(path: Path) -> str:
        return to_uri(path, follow_links=False)  # as the root's: the path as the user named it

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
    def _atomic(self, path: Path, create_only: bool = False) -> Iterator[Path]:
        """The one atomic write (pipeline.base.files) of `path`, its errors the store's."""
        with self._os_errors("write", path):
            try:
                with atomic_file(path, create_only=create_only) as temp:
                    yield temp
            except TargetExists:  # an OSError: caught before _os_errors makes it a StoreError
                raise ConflictError(f"{self._uri_of(path)} already exists") from None

    def _write(self, path: Path, data: bytes, create_only: bool = False) -> None:
        with self._atomic(path, create_only) as temp:
            temp.write_bytes(data)

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

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[BinaryIO | None]:
        """The object's file opened without following any link below the root; None when
        it does not exist. A link (or a directory link above it) is an IntegrityError: a store
        is untrusted, and a link would hand out whatever file it points at."""
        path = self._path(key)
        try:
            source = open_no_links(self.root, safe_relative(key))
        except (FileNotFoundError, NotADirectoryError):
            yield None
            return
        except UnsafeFileError as exc:
            raise IntegrityError(f"artifact store {self.uri}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"artifact store {self.uri}: cannot read {path}: {exc}") from exc
        with source, self._os_errors("read", path):
            yield source

    def stat(self, key: str) -> ObjectInfo | None:
        with self._reading(key) as source:
            if source is None:
                return None
            return ObjectInfo(os.fstat(source.fileno()).st_size, file_sha256(source))

    rehash = stat  # a local file has no separately recorded digest

    def get(self, key: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Blob | None:
        with self._reading(key) as source:
            if source is None:
                return None
            try:
                data = read_bounded(source, max_bytes, self.key_uri(key))
            except UnsafeFileError:
                size = os.fstat(source.fileno()).st_size
                raise too_large(self.key_uri(key), size, max_bytes) from None
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
                    raise ConflictError(f"{self._uri_of(path)} changed since it was read")
                self._write(path, data)
        except filelock.Timeout as exc:
            raise StoreError(f"{lock.lock_file}: still locked after {LOCK_TIMEOUT_S} s") from exc

    def upload(self, files: Mapping[str, tuple[Path, str]], *, create_only: bool = False) -> None:
        lost = []
        for key, (source, _digest) in files.items():
            try:
                with self._atomic(self._path(key), create_only) as temp:
                    shutil.copyfile(source, temp)
            except ConflictError:
                lost.append(key)  # the others still go: the caller compares them all
        if lost:
            raise ConflictError(f"{self.key_uri(lost[0])} (and {len(lost) - 1} more) exist")

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            path = self._path(key)
            with self._os_errors("delete", path):
                path.unlink(missing_ok=True)

    def _download(self, targets: Mapping[str, tuple[Path, ObjectInfo | None]]) -> None:
        for key, (target, _expected) in targets.items():
            with self._reading(key) as source, self._os_errors("copy", target):
                if source is None:
                    raise FileNotFoundError(errno.ENOENT, "no such object", str(self._path(key)))
                with target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
