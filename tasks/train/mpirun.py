"""Ranks of one host over MPI: Open MPI's `mpirun` starts them, Horovod exchanges over shared
memory.

Measured on 2 cores (see the README's training benchmark): a Horovod allreduce of the model's
gradients costs ~3.8 ms over Gloo (TCP on loopback, one Gloo negotiation a cycle) and ~0.15 ms
over MPI's shared-memory transport, against ~0.5 ms of compute a step. So the ranks of a
single-host run go through `mpirun` wherever Horovod was built with MPI and `mpirun` is
installed; elsewhere (and for rendezvous jobs and horovodrun over ssh) they use Gloo.

`mpirun` is a third-party process with a text protocol of its own: `--tag-output` prefixes each
piece a rank writes with "[JOB,RANK]<stdout>:", and a failed rank is reported in one of two
forms (a signal, or a "Process name" / "Exit code" pair). `MpirunOutput` is the one place that
reads them. A rank's messages (`tasks.train.messages`) are single writes, so they arrive whole.

When the launcher itself is killed (SIGKILL: nothing of it runs), mpirun would go on with its
ranks: every rank also watches the launcher's pid (`PIPELINE_LAUNCHER_PID`) and ends itself when
it is gone (`tasks.train.rank.exit_with_parent`); mpirun then ends with them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from functools import cache
from pathlib import Path

from tasks.train.launcher import Launch, RankExit
from tasks.train.messages import LAUNCHER_PID

_TAG = r"\[\d+,(\d+)\]<(stdout|stderr)>:"
_TAGGED_RE = re.compile(rf"^{_TAG}(.*)$")
# mpirun tags each write, not each line: a line written in pieces carries a tag per piece.
_INNER_TAG_RE = re.compile(_TAG)
_SIGNAL_RE = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)")
_PROCESS_RE = re.compile(r"Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_EXIT_CODE_RE = re.compile(r"Exit code:\s*(-?\d+)")
# Horovod's background loop polls every cycle: 0.1 ms keeps a step's exchange short (1 ms,
# Horovod's default, measured 1,058 us an allreduce here against 152 us).
MPI_CYCLE_TIME_MS = "0.1"


@cache
def horovod_has_mpi() -> bool:
    """Whether the installed Horovod was built against MPI (its MXNet extension links libmpi)."""
    spec = importlib.util.find_spec("horovod.mxnet")
    if spec is None or not spec.submodule_search_locations:
        return False
    for library in Path(spec.submodule_search_locations[0]).glob("mpi_lib*.so"):
        if b"libmpi.so" in library.read_bytes():
            return True
    return False


def available() -> bool:
    """Whether this host's ranks can run over MPI: Horovod built with it, `mpirun` on PATH."""
    return shutil.which("mpirun") is not None and horovod_has_mpi()


def rank_variables() -> dict[str, str]:
    """What every rank started by mpirun needs: MPI for Horovod's controller and operations (a
    Horovod built with both defaults to Gloo's operations), its short cycle, and the pid of
    the launcher it must not outlive."""
    return {
        "HOROVOD_CONTROLLER": "mpi",
        "HOROVOD_CPU_OPERATIONS": "mpi",
        "HOROVOD_CYCLE_TIME": MPI_CYCLE_TIME_MS,
        LAUNCHER_PID: str(os.getpid()),
    }


def binding(num_proc: int, cores: int) -> str:
    """mpirun's --bind-to: one rank a core when several fit (no rank migrates onto another's
    core mid-exchange); none for a single rank (bound, its own threads would share one core:
    measured 0.23 against 0.13 s/epoch) or more ranks than cores."""
    return "core" if 1 < num_proc <= cores else "none"


def mpirun_command(num_proc: int, command: list[str], env: dict[str, str]) -> list[str]:
    """mpirun starting `num_proc` ranks of `command` on this host, with `env` exported."""
    return [
        shutil.which("mpirun") or "mpirun",
        "--tag-output",
        "--allow-run-as-root",  # containers and CI run as root; refused otherwise
        "-np", str(num_proc),
        "--bind-to", binding(num_proc, len(os.sched_getaffinity(0))),
        "--oversubscribe",
        # This host only: no ssh (the images have none), shared memory between ranks, and no
        # single-copy (it needs ptrace, which containers and restricted pods do not allow).
        "--mca", "plm", "isolated",
        "--mca", "btl", "self,vader",
        "--mca", "btl_vader_single_copy_mechanism", "none",
        # A rank waiting in MPI yields its core instead of spinning on it: the rank's own
        # compute thread shares that core (measured: np=2 0.15 s/epoch, 0.2-0.33 spinning).
        "--mca", "mpi_yield_when_idle", "1",
        *[arg for name in sorted(env) for arg in ("-x", name)],
        *command,
    ]  # fmt: skip


def launch(num_proc: int, command: list[str], env: dict[str, str]) -> Launch:
    """The one process that starts this host's `num_proc` ranks over MPI."""
    env = {**rank_variables(), **env}  # a HOROVOD_CYCLE_TIME of the user's wins
    return Launch(mpirun_command(num_proc, command, env), env, output=MpirunOutput())


class MpirunOutput:
    """Reads mpirun's output line by line: a rank's line (rank, "stdout"|"stderr", text), a
    rank's failure (`RankExit`), or None for mpirun's own text."""

    def __init__(self) -> None:
        self._failed_rank: int | None = None  # "Process name" seen, its "Exit code" not yet

    def __call__(self, line: str) -> tuple[int, str, str] | RankExit | None:
        if match := _TAGGED_RE.match(line):
            return int(match.group(1)), match.group(2), _INNER_TAG_RE.sub("", match.group(3))
        if match := _SIGNAL_RE.search(line):
            return RankExit(int(match.group(1)), 128 + int(match.group(2)))
        if match := _PROCESS_RE.search(line):
            self._failed_rank = int(match.group(1))
        elif (match := _EXIT_CODE_RE.search(line)) and self._failed_rank is not None:
            rank, self._failed_rank = self._failed_rank, None
            return RankExit(rank, int(match.group(1)))
        return None
