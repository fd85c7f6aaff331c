"""Helpers of the train step's tests: run configs, run directories, rank processes, the hosts
of a two-host rendezvous job (fixtures: tests/tasks/train/conftest.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mxnet as mx
import numpy as np
import psutil

from pipeline.base.config import PipelineConfig

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
DEADLINE_S = 300  # bound of every wait on a training process
# Two names of this machine, so two "hosts" of a rendezvous job on loopback.
TWO_HOSTS = "localhost:1,127.0.0.1:1"
# train() in a process of its own, as a pod (or the CLI) runs it; prints the run dir URI.
TRAIN_SCRIPT = (
    "import sys; from pipeline.base.config import PipelineConfig; "
    "from tests.support.steps import trained; "
    "print(trained(PipelineConfig.model_validate_json(sys.argv[1]), sys.argv[2]).as_uri())"
)


# The same with the step's log lines on stderr: a test can wait for "joining the Gloo rendezvous".
LOGGING_TRAIN_SCRIPT = (
    "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); " + TRAIN_SCRIPT
)


def run_config(work_dir: Path, run_id: str, **overrides) -> PipelineConfig:
    # Checkpoints are copied to the artifact store: keep it inside the test's work dir.
    overrides.setdefault("artifact_store", (work_dir / "_store").as_uri())
    return PipelineConfig(work_dir=work_dir, run_id=run_id, mirrors=[DEBIAN_MIRROR], **overrides)


def path_of(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


def parameters(run_dir: Path, name: str = "model.params") -> dict[str, np.ndarray]:
    return {
        key: value.asnumpy() for key, value in mx.nd.load(str(run_dir / "model" / name)).items()
    }


def history(run_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / "metrics" / "train.jsonl").read_text().splitlines()
    ]


def rank_processes(run_dir: Path) -> list[psutil.Process]:
    """The live `python -m tasks.train.rank` rank processes of this run directory."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if (
            cmdline[1:3] == ["-m", "tasks.train.rank"]
            and str(run_dir / ".rank-config.json") in cmdline
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


def rank_number(environ: dict[str, str]) -> str | None:
    """The rank a process's environment says it is: Horovod's variable where the launcher or
    Gloo started it, Open MPI's where mpirun did; None for any other process."""
    return environ.get("HOROVOD_RANK", environ.get("OMPI_COMM_WORLD_RANK"))


def wait_until_no_ranks(run_dir: Path, timeout_s: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := rank_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def job_config(work_dir: Path, index: int, port: int, **overrides) -> PipelineConfig:
    """Host `index` of a two-host rendezvous job, with its own work dir as a pod has."""
    job = {"num_proc": 2, "hosts": TWO_HOSTS, "worker_index": index, "rendezvous_port": port}
    return run_config(work_dir / f"host-{index}", "job", **{**job, **overrides})


def start_host(
    config: PipelineConfig, data_uri: str, script: str = TRAIN_SCRIPT
) -> subprocess.Popen:
    command = [sys.executable, "-c", script, config.model_dump_json(), data_uri]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def job_hosts(configs: list[PipelineConfig]) -> Iterator[list[subprocess.Popen]]:
    """A list for the hosts' processes; on exit every host and every rank still running is
    stopped, also when the test failed."""
    hosts: list[subprocess.Popen] = []
    try:
        yield hosts
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
                host.communicate()
        for config in configs:
            for process in rank_processes(config.run_dir().resolve()):
                process.kill()


def finish(host: subprocess.Popen) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a host process, waited for at most DEADLINE_S."""
    out, err = host.communicate(timeout=DEADLINE_S)
    return host.returncode, out, err


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
