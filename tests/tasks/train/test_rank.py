"""tasks/train/rank.py, the parts a rank runs around its training loop: the first line of an
MXNet error, where a fresh or resumed rank 0 starts from, and ending with its launcher. (The
loop itself runs in every training of test_step*.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.base.config import ConfigError, PipelineConfig
from tasks.train.checkpoints import checkpoint_dir
from tasks.train.rank import ORPHAN_CHECK_S, _read_restore_point, first_line
from tests.support import REPO
from tests.support.checkpoints import write_epoch

# A launcher that starts a rank-side child calling exit_with_parent(), prints its pid, waits.
LAUNCHER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'from tasks.train.rank import "
    'exit_with_parent; exit_with_parent(); print("watching", flush=True); '
    "import time; time.sleep(600)'], stdout=subprocess.PIPE, text=True)\n"
    "assert child.stdout.readline() == 'watching\\n'\n"
    "print(child.pid, flush=True); time.sleep(600)\n"
)


def test_an_error_is_told_by_its_first_line() -> None:
    assert first_line(RuntimeError("bad shape\nStack trace:\n  [bt] (0) libmxnet.so")) == (
        "bad shape"
    )
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_a_fresh_start_removes_an_earlier_attempts_checkpoints(tmp_path: Path) -> None:
    config = PipelineConfig(run_id="run")
    write_epoch(tmp_path, 2, config)
    assert _read_restore_point(tmp_path, resume=False) is None
    assert not checkpoint_dir(tmp_path).exists()


def test_an_optimizer_file_mxnet_cannot_read_is_one_config_error(tmp_path: Path) -> None:
    """write_epoch's files have the NDArray header and random bytes after it: real MXNet
    refuses them when rank 0 loads the optimizer state to resume."""
    written = write_epoch(tmp_path, 2, PipelineConfig(run_id="run"))
    with pytest.raises(ConfigError, match=rf"resume: {written.optimizer} cannot be read: "):
        _read_restore_point(tmp_path, resume=True)


@pytest.mark.integration
def test_a_rank_whose_launcher_is_killed_ends_within_its_check_interval() -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    rank_pid = int(launcher.stdout.readline())
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10 * ORPHAN_CHECK_S + 20
    while time.monotonic() < deadline:
        try:
            os.kill(rank_pid, 0)
        except ProcessLookupError:
            return  # gone (reaped by init once orphaned)
        with open(f"/proc/{rank_pid}/stat") as stat:
            if stat.read().split(") ")[-1].startswith("Z"):
                return  # exited, not yet reaped
        time.sleep(0.1)
    os.kill(rank_pid, signal.SIGKILL)
    pytest.fail(f"the orphaned rank {rank_pid} was still running after its launcher died")
