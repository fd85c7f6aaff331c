"""Starting, watching and stopping rank processes; what to say when one fails.

`run_ranks` starts a group of processes, forwards rank 0's output to the step log (and to an
optional callback, e.g. progress), and raises `TrainingError` naming the first rank that failed
with its last stderr lines. Every process of the group is stopped when it returns, whatever
ends it: success, a failed rank (the others are stopped at once, as horovodrun does), an
exception, Ctrl-C, or SIGTERM/SIGHUP (the CLI turns those into exceptions). Ranks also end
themselves when the launcher is SIGKILLed (`tasks.train.rank.exit_with_parent`).
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
from typing import IO, NamedTuple

import psutil

from pipeline.base.logs import step_logger
from tasks.train.history import TrainingError

STDERR_TAIL_LINES = 20
STOP_GRACE_S = 10
# horovodrun prefixes every rank line with "[RANK]<stdout>:" or "[RANK]<stderr>:".
_RANK_LINE_RE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
_RANK_EXIT_RE = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")


class Launch(NamedTuple):
    """A process the launcher starts: horovodrun (`rank` None; it tags each line of its ranks
    with the rank and stream) or one rank (its own stdout and stderr)."""

    command: list[str]
    env: dict[str, str]
    rank: int | None = None


# --- pure core ------------------------------------------------------------------------------


def parse_output_line(line: str) -> tuple[int | None, str | None, str]:
    """(rank, "stdout"|"stderr", text) of a horovodrun output line; (None, None, line) for
    horovodrun's own lines."""
    match = _RANK_LINE_RE.match(line)
    if match is None:
        return None, None, line
    return int(match.group(1)), match.group(2), match.group(3)


def describe_exit(code: int) -> str:
    """Exit status as a shell reports it: 128+N means killed by signal N."""
    if code > 128:
        with suppress(ValueError):
            return f"status {code} ({signal.Signals(code - 128).name})"
    return f"status {code}"


def failure_message(
    returncode: int, stderr_tails: dict[int, Iterable[str]], launcher_lines: Iterable[str]
) -> str:
    """What went wrong, from the launcher's report of the first rank that exited non-zero."""
    launcher_lines = list(launcher_lines)
    exits = [m for m in map(_RANK_EXIT_RE.match, launcher_lines) if m]
    if not exits:
        tail = "\n  ".join(launcher_lines[-STDERR_TAIL_LINES:]) or "(no output)"
        return f"horovodrun exited with {describe_exit(returncode)}; its last lines:\n  {tail}"
    rank, code = int(exits[0].group(1)), int(exits[0].group(2))
    tail = "\n  ".join(stderr_tails.get(rank, ())) or "(no stderr output)"
    return (
        f"training failed: rank {rank} exited with {describe_exit(code)}; "
        f"last stderr lines of rank {rank}:\n  {tail}"
    )


def _first_failure(launcher_lines: Iterable[str]) -> int | None:
    exits = [m for m in map(_RANK_EXIT_RE.match, launcher_lines) if m]
    return int(exits[0].group(1)) if exits else None


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


class RankGroup:
    """The processes of one launch and what they said."""

    def __init__(self, launches: list[Launch], on_output: Callable[[str], None] | None) -> None:
        self.launches = launches
        self.on_output = on_output
        self.logger = step_logger(__name__)
        self.stderr_tails: dict[int, deque[str]] = defaultdict(
            lambda: deque(maxlen=STDERR_TAIL_LINES)
        )
        self.launcher_lines: deque[str] = deque(maxlen=200)
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.processes: list[subprocess.Popen] = []
        self.open_pipes: list[int] = []
        self.exit_codes: list[int] = []

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
                pipes = [(process.stdout, parse_output_line)]
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
            source, line = self.lines.get()
            if line is None:
                self._pipe_closed(source)
            else:
                self._handle(*line)

    def _pipe_closed(self, source: int) -> None:
        self.open_pipes[source] -= 1
        if self.open_pipes[source]:
            return
        code = exit_status(self.processes[source].wait())
        self.exit_codes.append(code)
        rank = self.launches[source].rank
        if code != 0 and rank is not None:
            # What horovodrun reports and does when one of its ranks fails.
            self.launcher_lines.append(f"Process {rank} exit with status code {code}.")
            self.stop()

    def _handle(self, rank: int | None, stream: str | None, text: str) -> None:
        if rank is None:
            self.launcher_lines.append(text)
            self.logger.debug("horovodrun: %s", text)
            return
        if stream == "stderr":
            self.stderr_tails[rank].append(text)
        if rank == 0:
            self.logger.log(logging.INFO if stream == "stdout" else logging.WARNING, text)
            if stream == "stdout" and self.on_output is not None:
                self.on_output(text)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                stop_process_tree(process)

    def check(self) -> None:
        failed = [code for code in self.exit_codes if code != 0]
        if failed:
            message = failure_message(failed[0], self.stderr_tails, self.launcher_lines)
            raise TrainingError(message, _first_failure(self.launcher_lines), failed[0])


def run_ranks(launches: list[Launch], on_output: Callable[[str], None] | None = None) -> None:
    """Start `launches`, stream rank 0's lines to the step log (and `on_output`), raise
    TrainingError naming the first rank that failed; every process is stopped at the end, also
    on error, interrupt or termination."""
    group = RankGroup(launches, on_output)
    try:
        group.start()
        group.pump()
    finally:
        group.stop()
    group.check()
