"""Starting, watching and stopping rank processes; what to say when one fails.

`run_ranks` starts a group of processes and reads each rank's typed messages from its stdout
(`tasks.train.messages`): rank 0's notes and epochs go to the step log and its epochs to an
optional callback (checkpoint mirror, progress); a rank's own error is remembered, so the
supervisor knows a restart cannot help. It raises `TrainingError` naming the first rank that
failed with its last stderr lines. Every process of the group is stopped when it returns,
whatever ends it: success, a failed rank (the others are stopped at once, as horovodrun does),
an exception, Ctrl-C, or SIGTERM/SIGHUP (the CLI turns those into exceptions). Ranks also end
themselves when the launcher is SIGKILLed (`tasks.train.rank.exit_with_parent`).

horovodrun (ranks over ssh) is a third-party process with a text protocol of its own: it tags
each rank line "[RANK]<stdout>:" and reports a failed rank as "Process N exit with status code
S."; `horovodrun_line` is the one place that reads it.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import IO, NamedTuple

import psutil

from pipeline.base.logs import step_logger
from tasks.train.errors import TrainingError
from tasks.train.history import format_epoch
from tasks.train.messages import EpochDone, Note, RankFailed, decode

STDERR_TAIL_LINES = 20
STOP_GRACE_S = 10
_RANK_LINE_RE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
_RANK_EXIT_RE = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")


class RankExit(NamedTuple):
    """A rank that ended, and its exit status as a shell reports it."""

    rank: int
    status: int


OutputReader = Callable[[str], "tuple[int, str, str] | RankExit | None"]


class Launch(NamedTuple):
    """A process the launcher starts: one rank (`rank`; its own stdout and stderr), or a
    launcher of ranks (`rank` None: horovodrun, mpirun) whose merged output `output` reads:
    a rank's line (rank, stream, text), a rank's exit, or None for the launcher's own text."""

    command: list[str]
    env: dict[str, str]
    rank: int | None = None
    output: OutputReader | None = None  # None: horovodrun's format (`horovodrun_line`)


# --- pure core ------------------------------------------------------------------------------


def horovodrun_line(line: str) -> tuple[int, str, str] | RankExit | None:
    """What a line of horovodrun's output is: a rank's line (rank, "stdout"|"stderr", text), a
    rank's exit (`RankExit`), or None for horovodrun's own text."""
    match = _RANK_LINE_RE.match(line)
    if match is not None:
        return int(match.group(1)), match.group(2), match.group(3)
    match = _RANK_EXIT_RE.match(line)
    if match is not None:
        return RankExit(int(match.group(1)), int(match.group(2)))
    return None


def describe_exit(code: int) -> str:
    """Exit status as a shell reports it: 128+N means killed by signal N."""
    if code > 128:
        with suppress(ValueError):
            return f"status {code} ({signal.Signals(code - 128).name})"
    return f"status {code}"


def failure_message(
    failed: RankExit | None,
    launcher_status: int,
    stderr_tails: dict[int, Iterable[str]],
    launcher_lines: Iterable[str],
    launcher_name: str = "horovodrun",
) -> str:
    """What went wrong: the first rank that exited non-zero and its last stderr lines, or,
    when no rank is known to have failed, the launcher's (horovodrun's, mpirun's) last lines."""
    if failed is None:
        tail = "\n  ".join(list(launcher_lines)[-STDERR_TAIL_LINES:]) or "(no output)"
        status = describe_exit(launcher_status)
        return f"{launcher_name} exited with {status}; its last lines:\n  {tail}"
    tail = "\n  ".join(stderr_tails.get(failed.rank, ())) or "(no stderr output)"
    return (
        f"training failed: rank {failed.rank} exited with {describe_exit(failed.status)}; "
        f"last stderr lines of rank {failed.rank}:\n  {tail}"
    )


def exit_status(returncode: int) -> int:
    """As a shell (and horovodrun) reports it: killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


# --- shell ------------------------------------------------------------------------------------


def stop_process_tree(process: subprocess.Popen) -> None:
    """Kill `process` and everything it started, and reap them."""
    # Horovod's per-rank middleman calls setsid(), so horovodrun's ranks are outside its
    # process group: collect the whole tree before killing the group.
    tree: list[psutil.Process] = []
    with suppress(psutil.NoSuchProcess):
        tree = psutil.Process(process.pid).children(recursive=True)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in tree:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=STOP_GRACE_S)


def block_stop_signals() -> None:
    """Called first in a helper thread: Ctrl-C, SIGTERM and SIGHUP go to the main thread.

    The kernel hands a process signal to any thread that does not block it; one delivered to a
    helper leaves the main thread asleep in its queue wait until the next output line, so
    stopping the ranks could wait on ranks that print nothing."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _forward_lines(stream: IO[str], tag: Callable, source: int, lines: queue.SimpleQueue) -> None:
    # One thread per pipe: a rank writing to a pipe nobody reads would stall.
    block_stop_signals()
    for raw in stream:
        lines.put((source, tag(raw.rstrip("\r\n"))))
    lines.put((source, None))  # this pipe is closed


def _launcher_tag(read: OutputReader) -> Callable[[str], tuple | RankExit]:
    def tag(line: str) -> tuple[int | None, str | None, str] | RankExit:
        parsed = read(line)
        return (None, None, line) if parsed is None else parsed

    return tag


class RankGroup:
    """The processes of one launch, what their ranks sent and how they ended."""

    def __init__(
        self, launches: list[Launch], on_epoch: Callable[[EpochDone], None] | None
    ) -> None:
        self.launches = launches
        self.on_epoch = on_epoch
        self.logger = step_logger(__name__)
        self.stderr_tails: dict[int, deque[str]] = defaultdict(
            lambda: deque(maxlen=STDERR_TAIL_LINES)
        )
        self.launcher_lines: deque[str] = deque(maxlen=200)
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.processes: list[subprocess.Popen] = []
        self.open_pipes: list[int] = []
        self.launcher_status = 0  # horovodrun's or mpirun's, where one started the ranks
        self.rank_exits: list[RankExit] = []  # in the order they were seen
        self.reported: set[int] = set()  # ranks that sent their own error

    def start(self) -> None:
        for source, launch in enumerate(self.launches):
            process = subprocess.Popen(
                launch.command,
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                # horovodrun tags every rank line with its own <stdout>/<stderr>.
                stderr=subprocess.STDOUT if launch.rank is None else subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            self.processes.append(process)
            if launch.rank is None:
                pipes = [(process.stdout, _launcher_tag(launch.output or horovodrun_line))]
            else:
                pipes = [
                    (process.stdout, lambda text, r=launch.rank: (r, "stdout", text)),
                    (process.stderr, lambda text, r=launch.rank: (r, "stderr", text)),
                ]
            self.open_pipes.append(len(pipes))
            for pipe, tag in pipes:
                threading.Thread(
                    target=_forward_lines, args=(pipe, tag, source, self.lines), daemon=True
                ).start()

    def pump(self) -> None:
        """Handle output until every pipe is closed."""
        while any(self.open_pipes):
            source, item = self.lines.get()
            if item is None:
                self._pipe_closed(source)
            elif isinstance(item, RankExit):  # the launcher's report: it stops the others itself
                self.rank_exits.append(item)
            else:
                self._handle(*item)

    def _pipe_closed(self, source: int) -> None:
        self.open_pipes[source] -= 1
        if self.open_pipes[source]:
            return
        code = exit_status(self.processes[source].wait())
        rank = self.launches[source].rank
        if rank is None:
            self.launcher_status = code
            return
        self.rank_exits.append(RankExit(rank, code))
        if code != 0:
            self.stop()  # as horovodrun does: one failed rank ends the job

    def _handle(self, rank: int | None, stream: str | None, text: str) -> None:
        if rank is None:
            self.launcher_lines.append(text)
            self.logger.debug("launcher: %s", text)
        elif stream == "stderr":
            self.stderr_tails[rank].append(text)
            if rank == 0:
                self.logger.warning(text)
        else:
            self._received(rank, decode(text), text)

    def _received(
        self, rank: int, message: Note | EpochDone | RankFailed | None, text: str
    ) -> None:
        if isinstance(message, RankFailed):
            self.reported.add(rank)
        elif rank != 0:
            return  # rank 0 speaks for the job
        elif isinstance(message, EpochDone):
            self.logger.info(format_epoch(message.record, message.epochs))
            if self.on_epoch is not None:
                self.on_epoch(message)
        else:  # a note, or a library's stray line on stdout
            self.logger.log(logging.INFO, text if message is None else message.text)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                stop_process_tree(process)

    def check(self) -> None:
        failed = next((ended for ended in self.rank_exits if ended.status != 0), None)
        if failed is None and self.launcher_status == 0:
            return
        launchers = [Path(ln.command[0]).name for ln in self.launches if ln.rank is None]
        message = failure_message(
            failed, self.launcher_status, self.stderr_tails, self.launcher_lines, *launchers[:1]
        )
        if failed is None:
            raise TrainingError(message, None, self.launcher_status)
        raise TrainingError(message, failed.rank, failed.status, failed.rank in self.reported)


def run_ranks(launches: list[Launch], on_epoch: Callable[[EpochDone], None] | None = None) -> None:
    """Start `launches`, log rank 0's messages (and hand its epochs to `on_epoch`), raise
    TrainingError naming the first rank that failed; every process is stopped at the end, also
    on error, interrupt or termination."""
    group = RankGroup(launches, on_epoch)
    try:
        group.start()
        group.pump()
    finally:
        group.stop()
    group.check()
