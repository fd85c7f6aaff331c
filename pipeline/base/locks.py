"""One holder at a time: an exclusive, non-blocking `flock` on a lock file that names its holder.

Two runs started with the same run id share one run directory; without a lock a fresh start
of one deletes the other's checkpoints. The kernel releases an flock when its holder dies, even
by SIGKILL, so a lock file left behind never blocks a later run: only a live holder does.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.base.errors import PipelineError


class LockHeld(PipelineError):
    """Another live process holds the lock."""


def holder_of(lock_file: Path) -> str:
    """What the lock file says about its holder (its pid), for the error message."""
    try:
        text = lock_file.read_text(errors="replace").strip()
    except OSError:
        return "an unknown process"
    return f"pid {text}" if text.isdecimal() else "an unknown process"


@contextmanager
def exclusive_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold `lock_file` for the block; LockHeld at once (no waiting) when another holds it.

    `what` names the thing locked in the error, e.g. "run 'abc' (/work/abc)". The descriptor is
    close-on-exec: only this process holds the lock, the processes it starts do not."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"{what} is in use by {holder_of(lock_file)}: another run with the same run id "
                "is still running; wait for it to end or choose another --run-id"
            ) from None
        # The pid is written only once the lock is ours: a reader of a held lock sees its holder.
        holder = f"{os.getpid()}\n".encode()
        os.pwrite(fd, holder, 0)
        os.ftruncate(fd, len(holder))
        yield
    finally:
        os.close(fd)  # releases the lock
