"""Was the machine quiet while a row was timed? Load average and the other processes' CPU.

Load changes ratios, not only seconds: on this 2-core machine other jobs slowed np=1 far more
than np=2 (np=2/np=1 was 5.6-6.4x quiet, 2.0-3.7x loaded). So every row of a benchmark is timed
inside a `LoadWatch`, which samples the 1-minute load average and the CPU that processes outside
this benchmark's own process tree used meanwhile; a row is quiet when the others used under a
tenth of a core, and a benchmark starts quiet when, before its first row, the load average was
also below 1 (`load_before`). Tables mark the rows that were not, and `warn_if_loaded` says so
loudly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

QUIET_LOADAVG = 1.0
QUIET_OTHERS_CORES = 0.10
SAMPLE_S = 0.5


@dataclass
class Load:
    """What else ran while one row was timed."""

    loadavg_before: float
    loadavg_max: float = 0.0
    others_cores: float = 0.0  # mean CPU of the other processes, in cores

    @property
    def quiet(self) -> bool:
        """Nothing else used the CPU meanwhile. (The load average is recorded, not judged here:
        during a benchmark it counts the benchmark's own earlier rows too.)"""
        return self.others_cores < QUIET_OTHERS_CORES

    @property
    def quiet_start(self) -> bool:
        """A machine fit to start a benchmark on: load average under 1 and nothing else busy."""
        return self.loadavg_before < QUIET_LOADAVG and self.quiet

    def describe(self) -> str:
        mark = "" if self.quiet else " LOADED"
        loadavg = f"load {self.loadavg_before:.2f}->{self.loadavg_max:.2f}"
        return f"{loadavg}, others {self.others_cores:.2f} cores{mark}"


def _own_tree() -> set[int]:
    me = psutil.Process()
    return {me.pid, *(child.pid for child in me.children(recursive=True))}


def _others_cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of every process outside this benchmark's tree."""
    own, seconds = _own_tree(), {}
    for process in psutil.process_iter(["cpu_times"]):
        times = process.info["cpu_times"]
        if process.pid not in own and times is not None:
            seconds[process.pid] = times.user + times.system
    return seconds


@dataclass
class LoadWatch:
    """`with LoadWatch() as load:` samples the machine in a thread while the body runs."""

    load: Load = field(default_factory=lambda: Load(os.getloadavg()[0]))
    _done: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.load

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        started, first = time.monotonic(), _others_cpu_seconds()
        used = 0.0
        while not self._done.wait(SAMPLE_S):
            self.load.loadavg_max = max(self.load.loadavg_max, os.getloadavg()[0])
            now = _others_cpu_seconds()
            # Processes that started meanwhile count from zero; those that ended are lost
            # (an underestimate, never an overestimate).
            used = sum(seconds - first.get(pid, 0.0) for pid, seconds in now.items())
            self.load.others_cores = max(0.0, used) / (time.monotonic() - started)


def warn_if_loaded(loads: dict[str, Load], start: Load | None = None) -> bool:
    """Print a loud warning naming the rows timed on a busy machine (and a busy start);
    whether there was any."""
    loaded = {name: load for name, load in loads.items() if not load.quiet}
    if start is not None and not start.quiet_start:
        loaded = {"before the first row": start, **loaded}
    if loaded:
        bar = "!" * 78
        print(bar, file=sys.stderr)
        print(
            "WARNING: the machine was not quiet while these rows were timed; their ratios are",
            file=sys.stderr,
        )
        print(
            "not this code's (load slows np=1 more than np=2). Rerun on a quiet machine.",
            file=sys.stderr,
        )
        for name, load in loaded.items():
            print(f"  {name}: {load.describe()}", file=sys.stderr)
        print(bar, file=sys.stderr)
    return bool(loaded)


def load_before(window_s: float = 2.0) -> Load:
    """The machine just before a row whose work runs outside this process tree (containers
    under the Docker engine count as "others" while they run): sampled over `window_s`."""
    with LoadWatch() as load:
        time.sleep(window_s)
    load.loadavg_max = max(load.loadavg_max, load.loadavg_before)
    return load
