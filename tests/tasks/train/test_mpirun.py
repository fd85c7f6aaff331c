"""tasks/train/mpirun.py: reading mpirun's output, its command line, when MPI is used.

The output lines below are what a real `mpirun --tag-output` (Open MPI 4.1.4, Debian bookworm)
printed for two Python ranks, rank 1 killed by SIGKILL or exiting with status 3."""

from __future__ import annotations

import pytest

from tasks.train import mpirun
from tasks.train.launcher import RankExit, failure_message
from tasks.train.messages import LAUNCHER_PID

SIGKILLED = [
    "[1,1]<stdout>:hello from[1,1]<stdout>: [1,1]<stdout>:1[1,1]<stdout>:",
    "[1,1]<stderr>:err from[1,1]<stderr>: [1,1]<stderr>:1[1,1]<stderr>:",
    "[1,0]<stdout>:hello from 0",
    "--------------------------------------------------------------------------",
    "Primary job  terminated normally, but 1 process returned",
    "a non-zero exit code. Per user-direction, the job has been aborted.",
    "mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).",
]
EXITED = [
    "mpirun detected that one or more processes exited with non-zero status, thus causing",
    "the job to be terminated. The first process to do so was:",
    "",
    "  Process name: [[4612,1],1]",
    "  Exit code:    3",
    "--------------------------------------------------------------------------",
]


def test_rank_lines_lose_every_tag_mpirun_put_in_them() -> None:
    read = mpirun.MpirunOutput()
    assert read(SIGKILLED[0]) == (1, "stdout", "hello from 1")
    assert read(SIGKILLED[1]) == (1, "stderr", "err from 1")
    assert read(SIGKILLED[2]) == (0, "stdout", "hello from 0")
    assert read('[3,0]<stdout>:{"type": "note", "text": "x"}') == (
        0,
        "stdout",
        '{"type": "note", "text": "x"}',
    )


def test_a_killed_rank_and_a_failed_rank_are_read_from_mpiruns_report() -> None:
    read = mpirun.MpirunOutput()
    parsed = [read(line) for line in SIGKILLED[3:]]
    assert parsed == [None, None, None, RankExit(1, 137)]
    read = mpirun.MpirunOutput()
    assert [read(line) for line in EXITED] == [None, None, None, None, RankExit(1, 3), None]
    assert read("  Exit code:    3") is None  # an exit code without its process says nothing


def test_the_failure_names_the_rank_and_mpirun_when_no_rank_is_known() -> None:
    message = failure_message(RankExit(1, 137), 137, {1: ["err from 1"]}, [], "mpirun")
    assert message == (
        "training failed: rank 1 exited with status 137 (SIGKILL); "
        "last stderr lines of rank 1:\n  err from 1"
    )
    alone = failure_message(None, 1, {}, ["mpirun was unable to launch"], "mpirun")
    assert alone.startswith("mpirun exited with status 1; its last lines:")


def test_mpirun_exports_the_rank_environment_and_binds_a_rank_a_core() -> None:
    launch = mpirun.launch(2, ["python", "-m", "tasks.train.rank"], {"OMP_NUM_THREADS": "1"})
    command = launch.command
    assert launch.rank is None and isinstance(launch.output, mpirun.MpirunOutput)
    assert command[command.index("-np") + 1] == "2"
    assert command[-3:] == ["python", "-m", "tasks.train.rank"]
    exported = {command[i + 1] for i, arg in enumerate(command) if arg == "-x"}
    assert exported == set(launch.env)  # every variable of the ranks, and only those
    assert launch.env["HOROVOD_CONTROLLER"] == launch.env["HOROVOD_CPU_OPERATIONS"] == "mpi"
    assert launch.env[LAUNCHER_PID].isdigit()
    assert "--tag-output" in command and command[
        command.index("plm") - 1 : command.index("plm") + 2
    ] == ["--mca", "plm", "isolated"]


def test_a_users_cycle_time_wins_over_mpis_default(monkeypatch: pytest.MonkeyPatch) -> None:
    launch = mpirun.launch(1, ["rank"], {"HOROVOD_CYCLE_TIME": "2"})
    assert launch.env["HOROVOD_CYCLE_TIME"] == "2"
    assert mpirun.launch(1, ["rank"], {}).env["HOROVOD_CYCLE_TIME"] == mpirun.MPI_CYCLE_TIME_MS


def test_mpi_is_used_only_where_horovod_links_it_and_mpirun_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mpirun.shutil, "which", lambda name: None)
    assert not mpirun.available()  # no mpirun: the Gloo launch


def test_ranks_are_bound_one_a_core_only_when_several_fit() -> None:
    assert mpirun.binding(2, 2) == "core"
    assert mpirun.binding(1, 2) == "none"  # its own threads would share one core
    assert mpirun.binding(3, 2) == "none"  # more ranks than cores
