"""Local files, one way each: the atomic write, the file hash and the no-link read.

The atomic write (`atomic_file`; `atomic_write`, `atomic_writer` and `atomic_save` fill it in
their ways): a reader sees the old file or the whole new one, never half of one. The bytes go
to a hidden, uniquely named sibling first (two writers never share a temp file), are fsynced,
renamed over the target (or linked, create-only), and the directory is fsynced so that the
rename itself survives a power loss. The run directory, the dataset cache and the file://
store all write through it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline.base.errors import PipelineError

# A manifest lists a few dozen objects, latest.json one run: never read a huge document whole.
MAX_DOCUMENT_BYTES = 16 << 20


def _fsync_dir(directory: Path) -> None:
    """Make a rename, link or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_sibling(target: Path, suffix: str = ".partial") -> Path:
    """A fresh hidden file next to `target` (created empty, mode 0644)."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache or store
    os.close(fd)
    return Path(name)


class TargetExists(FileExistsError):
    """A create-only atomic write found its target already there (nothing was replaced)."""


def _fsync_file(path: Path) -> None:
    # Opened anew: whoever filled the temp file (a library, boto3's download) may have
    # replaced it by a rename of its own, and "rb+" works wherever fsync needs a writable fd.
    with path.open("rb+") as written:
        os.fsync(written.fileno())


def _place(temp: Path, target: Path, create_only: bool) -> None:
    if not create_only:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)  # atomic create-if-absent: fails when `target` exists
    except FileExistsError:
        raise TargetExists(errno.EEXIST, "already exists", str(target)) from None
    temp.unlink()


@contextmanager
def atomic_file(
    target: Path, *, suffix: str = ".partial", create_only: bool = False
) -> Iterator[Path]:
    """The one atomic write: a temp sibling path to fill; when the block completes it is
    fsynced, renamed over `target` and the directory is fsynced. Removed on any error.

    create_only: never replace an existing `target` (TargetExists, a FileExistsError, instead).
    `suffix` names the temp file, so that an owner can find what a killed writer left.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(target, suffix)
    try:
        yield temp
        _fsync_file(temp)
        _place(temp, target, create_only)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


@contextmanager
def atomic_writer(target: Path, suffix: str = ".partial") -> Iterator[BinaryIO]:
    """A binary file (e.g. a download streamed into it) that replaces `target` atomically and
    durably only if the block completes; removed otherwise."""
    with atomic_file(target, suffix=suffix) as temp, temp.open("wb") as sink:
        yield sink


def atomic_write(target: Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to `target` atomically and durably."""
    with atomic_file(target) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_save(target: Path, save: Callable[[str], object]) -> None:
    """Atomically create `target` with a library's `save(path)` (e.g. MXNet's save_parameters)."""
    with atomic_file(target) as temp:
        save(str(temp))


def file_sha256(source: Path | BinaryIO) -> str:
    """The SHA-256 (hex) of a file's bytes, streamed: a path (opened here) or a file already
    opened for reading (e.g. by `open_no_links`), hashed from where it stands."""
    if isinstance(source, Path):
        with source.open("rb") as opened:
            return hashlib.file_digest(opened, "sha256").hexdigest()
    return hashlib.file_digest(source, "sha256").hexdigest()


class UnsafeFileError(PipelineError):
    """A file that may not be read: a symlink (or under one), not a regular file, or larger than
    its bound. Run directories, caches and file:// stores are untrusted input: a link there
    could hand out any file the pipeline's user can read."""


def _open_flags() -> int:
    return os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_no_links(root: Path, relative: str | PurePosixPath) -> BinaryIO:
    """`root/relative` opened for reading, refusing a symlink at any component below `root`.

    Each directory is opened with O_NOFOLLOW relative to the one before (openat), so a link
    swapped in between a check and the read is refused too. `root` itself is the caller's.
    """
    parts = PurePosixPath(relative).parts
    where = root / PurePosixPath(relative)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = _open_flags() if last else _open_flags() | os.O_DIRECTORY
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) or _is_link(fd, part):
                    name = "/".join(parts[: index + 1])
                    raise UnsafeFileError(
                        f"{where}: {name} is a symbolic link (or not a directory); links are "
                        "never followed"
                    ) from None
                raise
            os.close(fd)
            fd = child
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeFileError(f"{where} is not a regular file")
        source = os.fdopen(fd, "rb")
        fd = -1
        return source
    finally:
        if fd >= 0:
            os.close(fd)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def read_bounded(source: BinaryIO, limit: int, where: str) -> bytes:
    """At most `limit` bytes of an open file; UnsafeFileError naming `where` when it holds more
    (the size is checked before a byte is read, and again by reading one byte past it)."""
    size = os.fstat(source.fileno()).st_size
    if size > limit:
        raise UnsafeFileError(f"{where}: {size} bytes, more than the {limit} a document may have")
    data = source.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{where}: more than the {limit} bytes a document may have")
    return data


def read_document_file(path: Path, limit: int) -> bytes:
    """A small local document (metrics.json, dataset.json, a pointer): no link, at most `limit`
    bytes. FileNotFoundError when absent; UnsafeFileError otherwise."""
    with open_no_links(path.parent, path.name) as source:
        return read_bounded(source, limit, str(path))
