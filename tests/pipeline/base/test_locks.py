"""pipeline/base/locks.py: one holder at a time, for real: the second holder is another
process, killed with SIGKILL to show that a dead holder's lock file blocks nobody."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.base.locks import LockHeld, exclusive_lock, holder_of

# Holds the lock given as argv[1], says so on stdout, then waits to be killed.
HOLDER = (
    "import sys, time; from pathlib import Path; "
    "from pipeline.base.locks import exclusive_lock\n"
    "with exclusive_lock(Path(sys.argv[1]), 'test'):\n"
    "    print('held', flush=True); time.sleep(600)\n"
)


def start_holder(lock_file: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_file)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"  # the event: the lock is the child's now
    return holder


def test_the_lock_file_names_its_holder_while_held_and_is_free_after(tmp_path: Path) -> None:
    lock_file = tmp_path / "deep" / "run.lock"
    with exclusive_lock(lock_file, "run 'r'"):
        assert holder_of(lock_file) == f"pid {os.getpid()}"
    with exclusive_lock(lock_file, "run 'r'"):  # released at the end of the block
        pass


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    lock_file = tmp_path / "run.lock"
    holder = start_holder(lock_file)
    try:
        with (
            pytest.raises(LockHeld, match=rf"run 'r' \(x\) is in use by pid {holder.pid}"),
            exclusive_lock(lock_file, "run 'r' (x)"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_leaves_a_lock_file_that_blocks_nobody(tmp_path) -> None:
    lock_file = tmp_path / "run.lock"
    holder = start_holder(lock_file)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_file.exists()
    with exclusive_lock(lock_file, "run 'r'"):
        assert holder_of(lock_file) == f"pid {os.getpid()}"


def test_a_process_started_inside_the_block_does_not_hold_the_lock(tmp_path: Path) -> None:
    lock_file = tmp_path / "run.lock"
    with exclusive_lock(lock_file, "run 'r'"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with exclusive_lock(lock_file, "run 'r'"):  # the child lives on; the lock is free
            assert child.poll() is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("text", "said"), [("123\n", "pid 123"), ("junk", "an unknown process")])
def test_holder_of_reads_a_pid_or_says_it_does_not_know(tmp_path, text, said) -> None:
    lock_file = tmp_path / "run.lock"
    lock_file.write_text(text)
    assert holder_of(lock_file) == said
    assert holder_of(tmp_path / "missing.lock") == "an unknown process"
