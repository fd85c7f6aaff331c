"""The one atomic write: a reader sees the old file or the whole new one, never half of one.

The bytes go to a hidden, uniquely named sibling first (two writers never share a temp file),
are fsynced, renamed over the target, and the directory is fsynced so that the rename itself
survives a power loss.
"""

from __future__ import annotations

import errno
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


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(target: Path, suffix: str = ".partial") -> Path:
    """A fresh hidden file next to `target` (created empty, mode 0644)."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache or store
    os.close(fd)
    return Path(name)


@contextmanager
def _staged(target: Path, suffix: str = ".partial") -> Iterator[Path]:
    """A temp sibling that replaces `target` (durably) if the block completes, else goes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(target, suffix)
    try:
        yield temp
        os.replace(temp, target)
        fsync_dir(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(target: Path, suffix: str = ".partial") -> Iterator[BinaryIO]:
    """A binary file that replaces `target` only if the block completes; removed otherwise."""
    with _staged(target, suffix) as temp, temp.open("wb") as sink:
        yield sink
        sink.flush()
        os.fsync(sink.fileno())


def atomic_write(target: Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to `target` atomically and durably."""
    with atomic_writer(target) as sink:
        sink.write(data.encode() if isinstance(data, str) else data)


def atomic_save(target: Path, save: Callable[[str], object]) -> None:
    """Atomically create `target` with a library's `save(path)` (e.g. MXNet's save_parameters)."""
    with _staged(target) as temp:
        save(str(temp))
        with temp.open("rb+") as written:
            os.fsync(written.fileno())


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
