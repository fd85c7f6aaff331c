"""What one gradient exchange costs at np=2: Horovod's allreduce against a raw socket exchange.

The model's gradients are 7,850 float32 (a 784x10 weight and 10 biases), 31,400 bytes. Rows:
  raw socket exchange   two processes on a socket pair, each sends its 31,400 bytes and
                        receives the other's, then sums them: the limit on this machine
  hvd.allreduce ENV     two Horovod ranks over Gloo (started as the train step starts them
                        without MPI), one allreduce of the same bytes, waited for, per call;
                        with the environment ENV set on top of the train step's rank environment
  ... over MPI          the same, the ranks started by mpirun as the train step starts them
                        where Horovod has MPI (shared memory)
Columns: microseconds per exchange (median over the calls), and the ratio to the raw exchange.

Run: .venv/bin/python -m bench.exchange [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.base.config import PipelineConfig
from tasks.train import mpirun, rendezvous
from tasks.train.step import rank_environment

NUM_FLOATS = 784 * 10 + 10
REPO_ROOT = Path(__file__).resolve().parents[1]


def _exchange(sock: socket.socket, mine: np.ndarray) -> np.ndarray:
    sock.sendall(mine.tobytes())
    received = bytearray()
    while len(received) < mine.nbytes:
        received += sock.recv(mine.nbytes - len(received))
    return mine + np.frombuffer(bytes(received), dtype=mine.dtype)


def raw_exchange_us(calls: int) -> float:
    """Median microseconds of one two-way exchange (and sum) of the gradients' bytes."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the other "rank": answers every exchange, then exits
        parent.close()
        mine = np.ones(NUM_FLOATS, np.float32)
        for _ in range(calls):
            _exchange(child, mine)
        os._exit(0)
    child.close()
    mine, seconds = np.ones(NUM_FLOATS, np.float32), []
    try:
        for _ in range(calls):
            start = time.perf_counter()
            _exchange(parent, mine)
            seconds.append(time.perf_counter() - start)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    return statistics.median(seconds) * 1e6


def rank_main(calls: int) -> None:
    """One Horovod rank: time `calls` allreduces of the gradients' size, print rank 0's."""
    import horovod.mxnet as hvd
    import mxnet as mx

    hvd.init()
    buffer = mx.nd.ones((NUM_FLOATS,))
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        hvd.allreduce_(buffer, average=False, name="gradients")
        buffer.wait_to_read()
        seconds.append(time.perf_counter() - start)
    if hvd.rank() == 0:
        print(json.dumps(statistics.median(seconds[calls // 10 :]) * 1e6))
    hvd.shutdown()


def hvd_allreduce_us(calls: int, extra_env: dict[str, str]) -> float:
    """Median microseconds of one allreduce at np=2, ranks started like the train step's."""
    config = PipelineConfig(num_proc=2)
    plan = rendezvous.slot_plan(None, None, 2)
    env = {**rank_environment(config, os.environ), **extra_env}
    command = [sys.executable, "-m", "bench.exchange", "--rank", "--calls", str(calls)]
    with rendezvous.rendezvous_server("127.0.0.1", 0, plan) as port:
        job = {**env, **rendezvous.job_variables("127.0.0.1", "lo", port)}
        ranks = [
            subprocess.Popen(
                command,
                env={**job, **rendezvous.rank_variables(slot)},
                stdout=subprocess.PIPE,
                cwd=REPO_ROOT,
            )
            for slot in plan
        ]
        try:
            outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
        finally:
            for rank in ranks:
                rank.kill()
                rank.wait()
    return float(outputs[0])


def hvd_allreduce_mpi_us(calls: int) -> float:
    """The same over MPI: two ranks started by mpirun as the train step starts them on one host
    where Horovod has MPI (`tasks.train.mpirun`)."""
    env = rank_environment(PipelineConfig(num_proc=2), os.environ)
    command = [sys.executable, "-m", "bench.exchange", "--rank", "--calls", str(calls)]
    launch = mpirun.launch(2, command, env)
    done = subprocess.run(
        launch.command, env=launch.env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    read = mpirun.MpirunOutput()
    for line in done.stdout.splitlines():
        parsed = read(line)
        if isinstance(parsed, tuple) and parsed[:2] == (0, "stdout"):
            return float(parsed[2])
    raise RuntimeError(f"mpirun exited with {done.returncode}: {done.stdout[-2000:]}")


# Rows measured by default; --env adds more (e.g. HOROVOD_CYCLE_TIME=0.1).
VARIANTS = {"(the train step's)": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="exchanges per row")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V[;K=V]", help="an extra row to measure"
    )
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.calls)
        return
    raw = raw_exchange_us(args.calls)
    print(f"one exchange of {NUM_FLOATS} float32 between 2 processes, median of {args.calls}\n")
    print(f"| {'variant':<40} | us/exchange | vs raw |")
    print(f"|{'-' * 42}|-------------|--------|")
    print(f"| {'raw socket exchange':<40} | {raw:11.1f} | {1:5.1f}x |")
    extra_rows = {text: dict(item.split("=", 1) for item in text.split(";")) for text in args.env}
    for name, extra in {**VARIANTS, **extra_rows}.items():
        micros = hvd_allreduce_us(args.calls, extra)
        print(f"| {'hvd.allreduce ' + name:<40} | {micros:11.1f} | {micros / raw:5.1f}x |")
    if mpirun.available():
        micros = hvd_allreduce_mpi_us(args.calls)
        print(
            f"| {'hvd.allreduce over MPI (mpirun)':<40} | {micros:11.1f} | {micros / raw:5.1f}x |"
        )


if __name__ == "__main__":
    main()
