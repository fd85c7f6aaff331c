"""What crossing hosts costs: s/epoch of the train step in containers, one host against two.

Rows, all in the pipeline image (PIPELINE_TEST_IMAGE, default fashion-pipeline:0.1.0), each
container with its own /cache volume holding the data set (from Debian's copy):
  np=1, one host        one container on both cores (--cpuset-cpus 0,1)
  np=2, one host        one container on both cores, two ranks
  np=2, two hosts       two containers on a Docker network, one core each (--cpuset-cpus 0 and
                        1), a rendezvous job (--worker-index, no ssh): Gloo over the bridge
Columns: s/epoch (median of the epochs), ratio to np=1. This kernel has no `netem` queueing
discipline, so link latency cannot be added: the two-host row crosses a veth bridge on one
machine, the best case of a real network.

Each row is preceded by a 2 s look at the machine (load average, other processes' CPU; the
containers' own work cannot be told apart from others' while they run), printed below the
table; rows that did not start on a quiet machine are warned about (bench.quiet).

Run: .venv/bin/python -m bench.multihost_speed [--epochs 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import uuid

from bench.quiet import Load, load_before, warn_if_loaded
from bench.table import print_ratio_table

IMAGE = os.environ.get("PIPELINE_TEST_IMAGE", "fashion-pipeline:0.1.0")
DEBIAN_DATA = "/usr/share/datasets/fashion-mnist"
LABEL = "io.fashion-pipeline.bench"
TIMEOUT_S = 900


def docker(*args: str, timeout: float = TIMEOUT_S) -> str:
    return subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout


class Bench:
    """Containers, volumes and a network labelled with one token, all removed at the end."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:8]
        self.network = f"fashion-bench-{self.token}"
        self.label = ["--label", f"{LABEL}={self.token}"]

    def __enter__(self) -> Bench:
        docker("network", "create", *self.label, self.network)
        return self

    def __exit__(self, *exc: object) -> None:
        selector = f"label={LABEL}={self.token}"
        for kind, args in (("container", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"])):
            found = docker(*args, "--filter", selector).split()
            if found:
                remove = ["rm", "-f"] if kind == "container" else ["volume", "rm", "-f"]
                docker(*remove, *found)
        docker("network", "rm", self.network)

    def volume_with_data(self) -> str:
        volume = f"fashion-bench-{self.token}-{uuid.uuid4().hex[:6]}"
        docker("volume", "create", *self.label, volume)
        self.run(volume, "0,1", "step", "dataset", "--mirrors", "file:///mirror/", detach=False,
                 extra=["-v", f"{DEBIAN_DATA}:/mirror:ro"])  # fmt: skip
        return volume

    def run(self, volume: str, cpus: str, *args: str, detach: bool, hostname: str = "",
            extra: list[str] | None = None) -> str:  # fmt: skip
        options = [*self.label, "--network", self.network, "--cpuset-cpus", cpus]
        options += ["-v", f"{volume}:/cache", "-e", "PIPELINE_ARTIFACT_STORE=file:///cache/store"]
        if hostname:
            options += ["--name", f"{hostname}-{self.token}", "--hostname", hostname]
            options += ["--network-alias", hostname]
        options += extra or []
        return docker("run", "-d" if detach else "--rm", *options, IMAGE, *args).strip()

    def epochs(self, volume: str, run_id: str) -> list[float]:
        path = f"/cache/work/{run_id}/metrics/train.jsonl"
        out = docker("run", "--rm", *self.label, "-v", f"{volume}:/cache", "--entrypoint", "cat",
                     IMAGE, path)  # fmt: skip
        return [json.loads(line)["seconds"] for line in out.splitlines()]


def one_host(bench: Bench, num_proc: int, epochs: int) -> list[float]:
    volume, run_id = bench.volume_with_data(), f"one-host-np{num_proc}"
    train = ["step", "train", "--run-id", run_id, "--epochs", str(epochs)]
    bench.run(volume, "0,1", *train, "--num-proc", str(num_proc), detach=False)
    return bench.epochs(volume, run_id)


def two_hosts(bench: Bench, epochs: int) -> list[float]:
    volumes = [bench.volume_with_data() for _ in range(2)]
    train = ["step", "train", "--run-id", "two-hosts", "--epochs", str(epochs)]
    train += ["--num-proc", "2", "--hosts", "host-a:1,host-b:1", "--max-restarts", "0"]
    containers = [
        bench.run(
            volume,
            str(index),
            *train,
            "--worker-index",
            str(index),
            detach=True,
            hostname=("host-a", "host-b")[index],
        )  # fmt: skip
        for index, volume in enumerate(volumes)
    ]
    codes = [int(docker("wait", container).strip()) for container in containers]
    if any(codes):
        logs = [docker("logs", "--tail", "20", c) for c in containers]
        raise SystemExit(f"two-host training failed: exit codes {codes}\n{logs}")
    return bench.epochs(volumes[0], "two-hosts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per row (median taken)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the rows")
    args = parser.parse_args()
    variants = {
        "np=1, one host (2 cores)": lambda bench: one_host(bench, 1, args.epochs),
        "np=2, one host (2 cores)": lambda bench: one_host(bench, 2, args.epochs),
        "np=2, two hosts (1 core each)": lambda bench: two_hosts(bench, args.epochs),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    loads: dict[str, Load] = {}
    start = load_before()
    with Bench() as bench:
        for repeat in range(args.repeats):  # ABC ABC ...: a drift of the machine hits all rows
            for name, run in variants.items():
                loads[f"{name}, round {repeat + 1}"] = load_before()
                seconds[name].append(statistics.median(run(bench)))
    per_epoch = {name: statistics.median(values) for name, values in seconds.items()}
    base = per_epoch["np=1, one host (2 cores)"]
    print(f"train step in containers ({IMAGE}), {args.epochs} epochs a row, median s/epoch")
    print(f"(median of {args.repeats} interleaved round(s))\n")
    print_ratio_table("variant", "s/epoch", per_epoch, base, "vs np=1")
    print()
    for name, load in loads.items():
        print(f"- before {name}: {load.describe()}")
    warn_if_loaded(loads, start)


if __name__ == "__main__":
    main()
