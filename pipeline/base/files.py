"""The one atomic write: a reader sees the old file or the whole new one, never half of one.

The bytes go to a hidden, uniquely named sibling first (two writers never share a temp file),
are fsynced, renamed over the target, and the directory is fsynced so that the rename itself
survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


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
