"""Tests of the train step: real Fashion-MNIST, real `horovodrun --gloo` with 1 and 2 ranks,
and real two-host rendezvous jobs (worker_index set: no horovodrun, no ssh) on loopback.

Trainings are shared through module-scoped fixtures (the machine has two cores); the pure core
(shards, batches, permutations, split, context choice, output parsing) needs no horovodrun.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mxnet as mx
import numpy as np
import psutil
import pytest
from pydantic import ValidationError

import tasks.train.step as train_module
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.store import open_store
from tasks.dataset import load_dataset, prepare_dataset
from tasks.train.errors import TrainingError
from tasks.train.history import best_epoch, train_summary
from tasks.train.launcher import RankExit, failure_message, horovodrun_line
from tasks.train.model import select_context
from tasks.train.rendezvous import route_interface
from tasks.train.sharding import epoch_permutation, global_batches, shard_bounds, split_validation
from tasks.train.step import threads_per_rank
from tests.support.seaweedfs import free_port
from tests.support.steps import for_run, trained

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
DEADLINE_S = 300  # bound of every wait on a training process
# Two names of this machine, so two "hosts" of a rendezvous job on loopback.
TWO_HOSTS = "localhost:1,127.0.0.1:1"
HEAD_START_S = 3  # how long host 1 runs alone before host 0 starts
# train() in a process of its own, as a pod (or the CLI) runs it; prints the run dir URI.
TRAIN_SCRIPT = (
    "import sys; from pipeline.base.config import PipelineConfig; "
    "from tests.support.steps import trained; "
    "print(trained(PipelineConfig.model_validate_json(sys.argv[1]), sys.argv[2]).as_uri())"
)


def run_config(work_dir: Path, run_id: str, **overrides) -> PipelineConfig:
    # Checkpoints are copied to the artifact store: keep it inside the test's work dir.
    overrides.setdefault("artifact_store", (work_dir / "_store").as_uri())
    return PipelineConfig(work_dir=work_dir, run_id=run_id, mirrors=[DEBIAN_MIRROR], **overrides)


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


def wait_until_no_ranks(run_dir: Path, timeout_s: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := rank_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def job_config(work_dir: Path, index: int, port: int, **overrides) -> PipelineConfig:
    """Host `index` of a two-host rendezvous job, with its own work dir as a pod has."""
    job = {"num_proc": 2, "hosts": TWO_HOSTS, "worker_index": index, "rendezvous_port": port}
    return run_config(work_dir / f"host-{index}", "job", **{**job, **overrides})


def start_host(config: PipelineConfig, data_uri: str) -> subprocess.Popen:
    command = [sys.executable, "-c", TRAIN_SCRIPT, config.model_dump_json(), data_uri]
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


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A verified dataset cache filled by the dataset step from the Debian copy."""
    cache = tmp_path_factory.mktemp("data")
    return prepare_dataset(PipelineConfig(mirrors=[DEBIAN_MIRROR], data_dir=cache))


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def np1_run(work_dir: Path, data_uri: str) -> Path:
    return trained(run_config(work_dir, "np1", num_proc=1, epochs=2), data_uri)


@pytest.fixture(scope="module")
def np2_run(work_dir: Path, data_uri: str) -> tuple[Path, list[str]]:
    """Two epochs at two ranks, with the launcher's log lines (no Prefect context here)."""
    capture = Capture()
    logger = logging.getLogger("tasks.train")
    logger.addHandler(capture)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        uri = trained(run_config(work_dir, "np2", num_proc=2, epochs=2), data_uri)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
    return uri, capture.messages


@pytest.fixture(scope="module")
def np2_again(work_dir: Path, data_uri: str) -> Path:
    return trained(run_config(work_dir, "np2-again", num_proc=2, epochs=2), data_uri)


@pytest.fixture(scope="module")
def five_epochs(work_dir: Path, data_uri: str) -> Path:
    """The seed's full recipe (5 epochs) at two ranks, uninterrupted."""
    return trained(run_config(work_dir, "five", num_proc=2, epochs=5), data_uri)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory, data_uri: str) -> tuple[Path, Path]:
    """A two-host rendezvous job of two epochs, both hosts started at once: their run dirs."""
    work_dir, port = tmp_path_factory.mktemp("two-hosts"), free_port()
    configs = [job_config(work_dir, index, port, epochs=2) for index in (0, 1)]
    run_dirs = [config.run_dir().resolve() for config in configs]
    with job_hosts(configs) as hosts:
        hosts += [start_host(config, data_uri) for config in configs]
        for host, run_dir in zip(hosts, run_dirs, strict=True):
            code, out, err = finish(host)
            assert code == 0, err
            assert out.splitlines()[-1] == run_dir.as_uri()  # train() returns it on every host
    return run_dirs[0], run_dirs[1]


# ----------------------------------------------------------------------------- real trainings


def test_one_and_two_ranks_train_the_same_model(np1_run: Path, np2_run) -> None:
    np2_dir, _ = np2_run
    one, two = parameters(np1_run), parameters(np2_dir)
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-5, err_msg=name)
    for first, second in zip(history(np1_run), history(np2_dir), strict=True):
        assert first["train_accuracy"] == pytest.approx(second["train_accuracy"], abs=1e-3)
        assert first["test_accuracy"] == pytest.approx(second["test_accuracy"], abs=1e-3)
        assert first["loss"] == pytest.approx(second["loss"], rel=1e-4)


def test_same_seed_and_ranks_give_bit_identical_parameters(np2_run, np2_again: Path) -> None:
    np2_dir, _ = np2_run
    for name in ("model.params", "model-0000.params"):
        first, second = parameters(np2_dir, name), parameters(np2_again, name)
        assert first.keys() == second.keys()
        for key in first:
            assert np.array_equal(first[key], second[key]), f"{name}: {key} differs"


def test_run_directory_holds_the_layout(np2_run, data_uri: str) -> None:
    run_dir, _ = np2_run
    config = PipelineConfig.model_validate_json((run_dir / "config.json").read_text())
    assert (config.num_proc, config.epochs, config.run_id) == (2, 2, "np2")

    records = history(run_dir)
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        assert set(record) == {"epoch", "loss", "train_accuracy", "test_accuracy", "seconds"}
        assert record["seconds"] > 0
    summary = json.loads((run_dir / "metrics" / "train.json").read_text())
    assert summary == {
        "epochs": 2,
        "train_accuracy": records[-1]["train_accuracy"],
        "test_accuracy": records[-1]["test_accuracy"],
        "val_accuracy": None,
        "best_epoch": 2,
        "num_proc": 2,
        "seconds": pytest.approx(sum(record["seconds"] for record in records), abs=1e-3),
    }
    assert (run_dir / "checkpoints" / "checkpoint.json").exists()

    # The exported model loads without our classes and scores what the train step reported.
    net = mx.gluon.SymbolBlock.imports(
        str(run_dir / "model" / "model-symbol.json"),
        ["data"],
        str(run_dir / "model" / "model-0000.params"),
    )
    data = load_dataset(data_uri)
    images = mx.nd.array(data.test_images.reshape(-1, 784).astype(np.float32) / 255)
    predicted = net(images).argmax(axis=1).asnumpy()
    assert (predicted == data.test_labels).mean() == pytest.approx(summary["test_accuracy"])


def test_rank_zero_epoch_lines_reach_the_step_log(np2_run) -> None:
    _, messages = np2_run
    epoch_lines = [message for message in messages if message.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert epoch_lines[0].startswith("epoch 1/2: loss ")


@pytest.mark.slow
def test_five_epochs_reach_the_seed_accuracy(five_epochs: Path) -> None:
    summary = json.loads((five_epochs / "metrics" / "train.json").read_text())
    assert summary["epochs"] == 5
    assert summary["train_accuracy"] >= 0.83
    assert summary["test_accuracy"] >= 0.81


def _kill_rank_one_after_first_epoch(run_dir: Path, outcome: dict) -> None:
    """SIGKILL rank 1 as soon as epoch 1 is reported (bounded in time)."""
    jsonl = run_dir / "metrics" / "train.jsonl"
    deadline = time.monotonic() + DEADLINE_S
    rank_one = None
    while time.monotonic() < deadline:
        if rank_one is None:
            for process in rank_processes(run_dir):
                try:
                    if process.environ().get("HOROVOD_RANK") == "1":
                        rank_one = process
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass  # not (or no longer) a rank of ours
        if rank_one is not None and jsonl.exists() and jsonl.read_text().strip():
            rank_one.send_signal(signal.SIGKILL)
            outcome["killed"] = True
            return
        time.sleep(0.005 if rank_one is not None else 0.1)
    outcome["killed"] = False


def test_without_restarts_a_killed_rank_fails_the_step_and_resume_ends_uninterrupted(
    work_dir: Path, data_uri: str, five_epochs: Path
) -> None:
    config = run_config(work_dir, "killed", num_proc=2, epochs=5, max_restarts=0)
    run_dir = config.run_dir().resolve()
    outcome: dict = {}
    killer = threading.Thread(target=_kill_rank_one_after_first_epoch, args=(run_dir, outcome))
    killer.start()
    try:
        with pytest.raises(TrainingError, match=r"rank 1 exited with status 137 \(SIGKILL\)"):
            trained(config, data_uri)
    finally:
        killer.join(DEADLINE_S)
    assert outcome["killed"]
    assert wait_until_no_ranks(run_dir) == [], "ranks outlived the failed step"
    pointer = json.loads((run_dir / "checkpoints" / "checkpoint.json").read_text())
    assert 1 <= pointer["epoch"] < 5, "the kill did not land inside the run"

    resumed = trained(config.model_copy(update={"resume": True}), data_uri)
    assert [record["epoch"] for record in history(resumed)] == [1, 2, 3, 4, 5]
    uninterrupted, after_resume = parameters(five_epochs), parameters(resumed)
    for key in uninterrupted:
        assert np.array_equal(uninterrupted[key], after_resume[key]), key
    assert not (run_dir / "metrics" / "restarts.jsonl").exists()


def test_a_killed_rank_is_restarted_from_the_last_checkpoint_with_the_ranks_left(
    work_dir: Path, data_uri: str, five_epochs: Path
) -> None:
    config = run_config(work_dir, "restarted", num_proc=2, epochs=5, max_restarts=2)
    run_dir = config.run_dir().resolve()
    outcome: dict = {}
    killer = threading.Thread(target=_kill_rank_one_after_first_epoch, args=(run_dir, outcome))
    capture, logger = Capture(), logging.getLogger("tasks.train")
    logger.addHandler(capture)
    killer.start()
    try:
        finished = trained(config, data_uri)  # completes by itself
    finally:
        killer.join(DEADLINE_S)
        logger.removeHandler(capture)
    assert outcome["killed"]
    assert wait_until_no_ranks(run_dir) == []
    restarts = [json.loads(line) for line in (run_dir / "metrics/restarts.jsonl").open()]
    assert len(restarts) == 1, restarts
    assert restarts[0]["rank"] == 1 and "SIGKILL" in restarts[0]["reason"]
    assert 1 <= restarts[0]["from_epoch"] < 5 and restarts[0]["num_proc"] == 1
    # Issue 22, item 4: one run, one config: the one asked for (num_proc 2, resume false), as
    # publish records it in the manifest; the restart is recorded beside it, not rewritten in.
    asked = for_run(config, data_uri)  # the config the step was given
    assert json.loads((run_dir / "config.json").read_text()) == asked.model_dump(mode="json")
    logged = [m for m in capture.messages if m.startswith("rank 1 exited with status 137")]
    assert logged == [
        f"rank 1 exited with status 137 (SIGKILL); restart 1 of at most 2 from epoch "
        f"{restarts[0]['from_epoch']} with 1 rank(s)"
    ]
    assert [record["epoch"] for record in history(finished)] == [1, 2, 3, 4, 5]
    # Every update is the mean over the same global batch at any number of ranks.
    uninterrupted, restarted = parameters(five_epochs), parameters(finished)
    for key in uninterrupted:
        np.testing.assert_allclose(restarted[key], uninterrupted[key], rtol=0, atol=1e-5)


@pytest.mark.s3
def test_a_resume_in_an_empty_work_dir_restores_the_checkpoint_from_the_store(
    tmp_path: Path, data_uri: str, five_epochs: Path, s3_env, s3_store_uri: str
) -> None:
    store = {"artifact_store": s3_store_uri, "s3_endpoint_url": s3_env.endpoint}
    first_host = run_config(tmp_path / "first", "moved", num_proc=2, epochs=2, **store)
    trained(first_host, data_uri)
    stored = open_store(s3_store_uri, endpoint_url=s3_env.endpoint).child("runs/moved/checkpoints")
    assert {"checkpoint.json", "epoch-0002.params"} <= set(stored.list_keys())

    # Another host: an empty work directory, the same run id, the same store.
    fresh = run_config(tmp_path / "fresh", "moved", num_proc=2, epochs=5, resume=True, **store)
    assert not fresh.run_dir().exists()
    resumed = trained(fresh, data_uri)
    assert [record["epoch"] for record in history(resumed)] == [1, 2, 3, 4, 5]
    uninterrupted, after_resume = parameters(five_epochs), parameters(resumed)
    for key in uninterrupted:
        assert np.array_equal(uninterrupted[key], after_resume[key]), key


@pytest.mark.s3
def test_resume_auto_starts_fresh_then_a_retry_resumes_from_the_store(
    tmp_path: Path, data_uri: str, five_epochs: Path, s3_env, s3_store_uri: str, monkeypatch
) -> None:
    """A retried Kubernetes pod: the same run id and PIPELINE_RESUME=auto every time."""
    monkeypatch.setenv("PIPELINE_RESUME", "auto")
    store = {"artifact_store": s3_store_uri, "s3_endpoint_url": s3_env.endpoint}
    first_pod = run_config(tmp_path / "first", "retried", num_proc=2, epochs=2, **store)
    assert first_pod.resume == "auto"
    fresh = trained(first_pod, data_uri)  # nothing to resume: a fresh start, no error
    assert [record["epoch"] for record in history(fresh)] == [1, 2]

    second_pod = run_config(tmp_path / "second", "retried", num_proc=2, epochs=5, **store)
    resumed = trained(second_pod, data_uri)
    assert [record["epoch"] for record in history(resumed)] == [1, 2, 3, 4, 5]
    uninterrupted, after_resume = parameters(five_epochs), parameters(resumed)
    for key in uninterrupted:
        assert np.array_equal(uninterrupted[key], after_resume[key]), key


# Makes every rank kill itself with SIGKILL as it starts (Python imports sitecustomize at
# start-up): a real process that dies by a real signal at every start.
DIE_AT_START = (
    "import os, signal\n"
    "if 'HOROVOD_RANK' in os.environ:\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
)


def test_a_rank_that_dies_at_every_start_stops_after_max_restarts(
    work_dir: Path, data_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sitecustomize.py").write_text(DIE_AT_START)
    paths = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    config = run_config(work_dir, "dies-always", num_proc=2, epochs=1, max_restarts=2)
    pattern = r"^gave up after 2 restart\(s\) \(max_restarts=2\): training failed: rank \d "
    with pytest.raises(TrainingError, match=pattern + r"exited with status 137 \(SIGKILL\)"):
        trained(config, data_uri)
    run_dir = config.run_dir().resolve()
    assert wait_until_no_ranks(run_dir) == []
    restarts = [json.loads(line) for line in (run_dir / "metrics/restarts.jsonl").open()]
    assert [(r["restart"], r["from_epoch"], r["num_proc"]) for r in restarts] == [
        (1, 0, 1),
        (2, 0, 1),
    ]


def test_validation_split_keeps_the_best_epoch(work_dir: Path, data_uri: str) -> None:
    config = run_config(work_dir, "val", num_proc=1, epochs=3, validation_fraction=0.1)
    run_dir = trained(config, data_uri)
    records = history(run_dir)
    assert all("val_accuracy" in record for record in records)
    summary = json.loads((run_dir / "metrics" / "train.json").read_text())
    best = max(records, key=lambda record: (record["val_accuracy"], -record["epoch"]))
    assert summary["best_epoch"] == best["epoch"]
    assert summary["val_accuracy"] == best["val_accuracy"]
    kept = mx.nd.load(str(run_dir / "checkpoints" / f"epoch-{best['epoch']:04d}.params"))
    for key, value in parameters(run_dir).items():
        assert np.array_equal(value, kept[key].asnumpy()), key


def test_a_rank_error_is_reported_with_its_stderr_lines(work_dir: Path, tmp_path: Path) -> None:
    empty_cache = tmp_path / "no-data"
    empty_cache.mkdir()
    config = run_config(work_dir, "no-data", num_proc=2, epochs=1)
    with pytest.raises(TrainingError, match=r"(?s)rank \d exited with status 1;.*error: .*no-data"):
        trained(config, empty_cache.as_uri())
    assert wait_until_no_ranks(config.run_dir().resolve()) == []


def test_an_interrupted_launcher_leaves_no_ranks_behind(work_dir: Path, data_uri: str) -> None:
    config = run_config(work_dir, "interrupted", num_proc=2, epochs=200)
    run_dir = config.run_dir().resolve()
    # As at a terminal, where Ctrl-C means SIGINT: a shell without job control (CI running
    # `make test &`) starts its commands with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler.
    ctrl_c = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    command = [
        sys.executable, "-c", ctrl_c + TRAIN_SCRIPT,
        config.model_dump_json(), data_uri,
    ]  # fmt: skip
    launcher = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + DEADLINE_S
        jsonl = run_dir / "metrics" / "train.jsonl"
        while not (jsonl.exists() and jsonl.read_text().strip()):
            assert time.monotonic() < deadline, "no epoch finished in time"
            assert launcher.poll() is None, "the launcher ended before it was interrupted"
            time.sleep(0.1)
        assert len(rank_processes(run_dir)) == 2
        launcher.send_signal(signal.SIGINT)  # what Ctrl-C or a cancelled run does
        assert launcher.wait(timeout=60) != 0
        assert wait_until_no_ranks(run_dir) == [], "ranks outlived the interrupted launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for process in rank_processes(run_dir):
            process.kill()


def without_seconds(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


def test_two_hosts_without_ssh_train_the_horovodrun_model(two_hosts, np2_run) -> None:
    host_zero, host_one = two_hosts
    np2_dir, _ = np2_run
    # Same seed, same 2 ranks, same plan of shards: the model horovodrun -np 2 trained.
    for name in ("model.params", "model-0000.params"):
        expected, trained = parameters(np2_dir, name), parameters(host_zero, name)
        assert expected.keys() == trained.keys()
        for key in expected:
            assert np.array_equal(expected[key], trained[key]), f"{name}: {key} differs"
    assert without_seconds(history(host_zero)) == without_seconds(history(np2_dir))
    assert json.loads((host_zero / "metrics" / "train.json").read_text())["num_proc"] == 2
    # Host 1 ran rank 1 only: its run directory holds the run's config, and no model (and,
    # hidden, never published: the config its rank read and its run lock).
    assert sorted(path.name for path in host_one.iterdir()) == [
        ".rank-config.json",
        ".run-host-1.lock",
        "config.json",
    ]
    assert wait_until_no_ranks(host_zero) == [] and wait_until_no_ranks(host_one) == []


def test_a_host_started_before_host_zero_waits_for_its_rendezvous(
    tmp_path: Path, data_uri: str
) -> None:
    port = free_port()
    host_zero, host_one = configs = [
        job_config(tmp_path, index, port, epochs=1) for index in (0, 1)
    ]
    with job_hosts(configs) as hosts:
        hosts.append(start_host(host_one, data_uri))
        time.sleep(HEAD_START_S)
        assert hosts[0].poll() is None, f"host 1 gave up alone: {finish(hosts[0])[2]}"
        assert rank_processes(host_one.run_dir().resolve()) == [], "rank 1 started alone"
        hosts.append(start_host(host_zero, data_uri))
        for host in hosts:
            code, _, err = finish(host)
            assert code == 0, err
    summary = json.loads((host_zero.run_dir() / "metrics" / "train.json").read_text())
    assert (summary["epochs"], summary["num_proc"]) == (1, 2)


def test_a_host_whose_host_zero_never_comes_fails_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real wait, against a port nobody serves, bounded by 3 s instead of 120 s.
    monkeypatch.setattr(train_module, "RENDEZVOUS_TIMEOUT_S", 3.0)
    port = free_port()
    config = run_config(
        tmp_path / "work",
        "alone",
        num_proc=2,
        hosts="127.0.0.1:1,localhost:1",
        worker_index=1,
        rendezvous_port=port,
    )
    started = time.monotonic()
    with pytest.raises(
        TrainingError, match=rf"no Gloo rendezvous at 127\.0\.0\.1:{port} after 3 s \(.*refused"
    ):
        trained(config, "file:///nowhere")
    assert 3 <= time.monotonic() - started < 3 + 10
    assert rank_processes(config.run_dir().resolve()) == []


def test_a_host_zero_whose_other_host_never_comes_fails_and_stops_its_rendezvous(
    tmp_path: Path, data_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real waits (host 0's for its own rendezvous, Gloo's for rank 1), bounded by 3 s.
    monkeypatch.setattr(train_module, "RENDEZVOUS_TIMEOUT_S", 3.0)
    port = free_port()
    config = job_config(tmp_path, 0, port, epochs=1)
    with pytest.raises(TrainingError, match=r"(?s)rank 0 exited .*Wait timeout after 3 seconds"):
        trained(config, data_uri)
    with pytest.raises(ConnectionRefusedError):  # the rendezvous server is gone with the step
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert wait_until_no_ranks(config.run_dir().resolve()) == []


def _kill_host_one_after_first_epoch(host: subprocess.Popen, run_dir: Path, outcome: dict) -> None:
    """SIGKILL host 1 (its launcher and its rank at once, as a lost machine) as soon as host 0
    reports epoch 1 (bounded in time)."""
    jsonl = run_dir / "metrics" / "train.jsonl"
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and host.poll() is None:
        if jsonl.exists() and jsonl.read_text().strip():
            processes = [psutil.Process(host.pid), *psutil.Process(host.pid).children(True)]
            for process in processes:
                process.kill()
            outcome["killed"] = True
            return
        time.sleep(0.01)
    outcome["killed"] = False


def test_host_zero_goes_on_alone_when_the_other_host_dies(
    tmp_path: Path, data_uri: str, five_epochs: Path
) -> None:
    port = free_port()
    configs = [job_config(tmp_path, index, port, epochs=5) for index in (0, 1)]
    run_dir = configs[0].run_dir().resolve()
    outcome: dict = {}
    with job_hosts(configs) as hosts:
        hosts += [start_host(config, data_uri) for config in configs]
        _kill_host_one_after_first_epoch(hosts[1], run_dir, outcome)
        code, out, err = finish(hosts[0])
    assert outcome["killed"]
    assert code == 0, err
    assert out.splitlines()[-1] == run_dir.as_uri()
    [restart] = [json.loads(line) for line in (run_dir / "metrics/restarts.jsonl").open()]
    assert restart["rank"] == 0 and restart["num_proc"] == 1 and 1 <= restart["from_epoch"] < 5
    assert [record["epoch"] for record in history(run_dir)] == [1, 2, 3, 4, 5]
    uninterrupted, alone = parameters(five_epochs), parameters(run_dir)
    for key in uninterrupted:
        np.testing.assert_allclose(alone[key], uninterrupted[key], rtol=0, atol=1e-5)


def test_a_host_zero_whose_rendezvous_port_is_taken_fails_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            TrainingError, match=rf"cannot serve the Gloo rendezvous on port {port}: .*in use"
        ):
            trained(job_config(tmp_path, 0, port), "file:///nowhere")


def test_a_rank_error_on_one_host_fails_every_host_naming_its_rank(
    tmp_path: Path, data_uri: str
) -> None:
    empty_cache = tmp_path / "no-data"
    empty_cache.mkdir()
    port = free_port()
    configs = [job_config(tmp_path, index, port, epochs=1) for index in (0, 1)]
    with job_hosts(configs) as hosts:
        hosts += [start_host(configs[0], data_uri), start_host(configs[1], empty_cache.as_uri())]
        (code_zero, _, err_zero), (code_one, _, err_one) = map(finish, hosts)
    assert code_one != 0
    assert re.search(
        r"TrainingError: training failed: rank 1 exited with status 1; last stderr lines of "
        r"rank 1:\n  error: .*no-data",
        err_one,
    ), err_one
    # Rank 0 loses its peer; its host fails too, and only host 0 would have published.
    assert code_zero != 0
    assert "TrainingError: training failed: rank 0 exited with status 1" in err_zero, err_zero
    for config in configs:
        assert wait_until_no_ranks(config.run_dir().resolve()) == []


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 0}, "greater than 0"),
        ({"lr": -0.1}, "greater than 0"),
        ({"batch_size": 0}, "greater than or equal to 1"),
        ({"num_proc": 4, "batch_size": 2}, "num_proc=4 is larger than batch_size=2"),
        ({"hosts": "localhost"}, "not Horovod host syntax"),
        ({"hosts": "localhost:2", "num_proc": 3}, "fewer than num_proc=3"),
    ],
)
def test_bad_training_options_are_rejected_by_the_config(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(**overrides)


def _assert_nothing_started(config: PipelineConfig) -> None:
    assert not config.run_dir().exists()
    launched = [
        child
        for child in psutil.Process().children(recursive=True)
        if any("horovodrun" in part or part == "tasks.train.rank" for part in child.cmdline())
    ]
    assert launched == []


@pytest.mark.parametrize(
    ("hostfile_text", "message"),
    [
        (None, "hostfile .* does not exist"),
        ("node1\n", "expected lines 'HOST slots=N'"),
        ("localhost slots=1\n", "Requested more processes"),
    ],
)
def test_bad_hostfile_fails_before_any_process_starts(
    tmp_path: Path, hostfile_text: str | None, message: str
) -> None:
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    config = run_config(tmp_path / "work", "bad-hostfile", num_proc=2, hostfile=hostfile)
    with pytest.raises(ConfigError, match=message):
        trained(config, "file:///nowhere")
    _assert_nothing_started(config)


def test_resume_without_checkpoint_fails_before_any_process_starts(tmp_path: Path) -> None:
    config = run_config(tmp_path / "work", "never-ran", resume=True)
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint"):
        trained(config, "file:///nowhere")
    _assert_nothing_started(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 3, "lr": 0.2}, r"was trained with .*'lr': 0\.1"),
        ({"epochs": 1}, r"is after epoch 2, beyond epochs=1"),
    ],
)
def test_resume_that_cannot_continue_the_checkpoint_is_refused(
    work_dir: Path, np1_run: Path, overrides: dict, message: str
) -> None:
    config = run_config(work_dir, "np1", num_proc=1, resume=True, **overrides)
    with pytest.raises(ConfigError, match=message):
        trained(config, "file:///nowhere")
    assert len(history(np1_run)) == 2  # untouched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_proc": 1}, r"num_proc=1 but hosts 'localhost:1,127\.0\.0\.1:1' offer 2 slots"),
        ({"hosts": "localhost:1,localhost:1"}, r"lists localhost more than once"),
        ({"hostfile": Path("hostfile")}, r"hostfile hostfile cannot be used with worker_index"),
    ],
)
def test_bad_rendezvous_job_fails_before_any_process_starts(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    config = job_config(tmp_path / "work", 0, free_port(), **overrides)
    with pytest.raises(ConfigError, match=message):
        trained(config, "file:///nowhere")
    _assert_nothing_started(config)


# ----------------------------------------------------------------------------- pure core


@pytest.mark.parametrize("num_samples", [0, 1, 7, 96, 128, 255, 256])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8])
def test_shards_cut_like_numpy_array_split(num_samples: int, num_ranks: int) -> None:
    samples = np.arange(num_samples)
    expected = np.array_split(samples, num_ranks)
    for rank in range(num_ranks):
        lo, hi = shard_bounds(num_samples, num_ranks, rank)
        assert np.array_equal(samples[lo:hi], expected[rank])


def test_global_batches_cover_the_epoch_and_drop_a_tail_smaller_than_the_ranks() -> None:
    assert global_batches(600, 256, 2) == [(0, 256), (256, 512), (512, 600)]
    assert global_batches(513, 256, 2) == [(0, 256), (256, 512)]  # 1 sample for 2 ranks
    assert global_batches(513, 256, 1) == [(0, 256), (256, 512), (512, 513)]
    assert global_batches(60000, 256, 2)[-1] == (59904, 60000)
    assert global_batches(3, 256, 4) == []


def test_epoch_permutation_is_fixed_by_seed_and_epoch() -> None:
    first = epoch_permutation(1000, seed=7, epoch=1)
    assert np.array_equal(np.sort(first), np.arange(1000))
    assert np.array_equal(first, epoch_permutation(1000, seed=7, epoch=1))
    assert not np.array_equal(first, epoch_permutation(1000, seed=7, epoch=2))
    assert not np.array_equal(first, epoch_permutation(1000, seed=8, epoch=1))


def test_validation_split_is_a_fixed_disjoint_hold_out() -> None:
    train_idx, val_idx = split_validation(1000, 0.1, seed=3)
    assert len(val_idx) == 100
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    again_train, again_val = split_validation(1000, 0.1, seed=3)
    assert np.array_equal(val_idx, again_val) and np.array_equal(train_idx, again_train)
    assert not np.array_equal(val_idx, split_validation(1000, 0.1, seed=4)[1])
    assert len(split_validation(1000, 0.0, seed=3)[1]) == 0
    assert len(split_validation(1000, 1e-9, seed=3)[1]) == 1


def test_context_is_one_gpu_per_local_rank_else_the_cpu() -> None:
    assert select_context(num_gpus=0, local_rank=3) == mx.cpu()
    assert select_context(num_gpus=4, local_rank=0) == mx.gpu(0)
    assert select_context(num_gpus=4, local_rank=3) == mx.gpu(3)
    with pytest.raises(TrainingError, match="local rank 2 has no GPU: this host has 2"):
        select_context(num_gpus=2, local_rank=2)


def test_ranks_of_a_host_share_its_cores() -> None:
    assert threads_per_rank(cpu_count=16, ranks_per_host=4, useful_threads=8) == 4
    assert threads_per_rank(cpu_count=16, ranks_per_host=1, useful_threads=8) == 8
    assert threads_per_rank(cpu_count=2, ranks_per_host=3, useful_threads=8) == 1
    assert threads_per_rank(cpu_count=64, ranks_per_host=2) == 1  # the seed model: one is best


def test_kept_epoch_is_the_best_validation_epoch_else_the_last() -> None:
    plain = [{"epoch": 1}, {"epoch": 2}]
    assert best_epoch(plain) == 2
    validated = [
        {"epoch": 1, "val_accuracy": 0.5, "train_accuracy": 0.4, "test_accuracy": 0.45},
        {"epoch": 2, "val_accuracy": 0.8, "train_accuracy": 0.7, "test_accuracy": 0.75},
        {"epoch": 3, "val_accuracy": 0.8, "train_accuracy": 0.9, "test_accuracy": 0.76},
    ]
    for record in validated:
        record["seconds"] = 1.5
    assert best_epoch(validated) == 2  # ties keep the earlier epoch
    assert train_summary(validated, num_proc=2) == {
        "epochs": 3,
        "train_accuracy": 0.7,
        "test_accuracy": 0.75,
        "val_accuracy": 0.8,
        "best_epoch": 2,
        "num_proc": 2,
        "seconds": 4.5,
    }


def test_horovodrun_lines_are_split_into_rank_stream_and_text() -> None:
    assert horovodrun_line("[1]<stderr>:Killed") == (1, "stderr", "Killed")
    assert horovodrun_line('[12]<stdout>:{"type": "note"}') == (12, "stdout", '{"type": "note"}')
    assert horovodrun_line("Process 1 exit with status code 137.") == RankExit(1, 137)
    assert horovodrun_line("Terminating remaining workers after failure of Process 1.") is None


def test_failure_message_names_the_first_failed_rank_and_its_stderr() -> None:
    # The exact lines a real `horovodrun --gloo` printed when rank 1 was SIGKILLed.
    launcher_lines = [
        "Process 1 exit with status code 137.",
        "Terminating remaining workers after failure of Process 1.",
        "Process 0 exit with status code 143.",
    ]
    tails = {0: ["Terminated"], 1: ["Killed"]}
    exits = [e for e in map(horovodrun_line, launcher_lines) if isinstance(e, RankExit)]
    first_failed = exits[0]
    message = failure_message(first_failed, 1, tails, launcher_lines)
    assert message.startswith("training failed: rank 1 exited with status 137 (SIGKILL)")
    assert message.endswith("last stderr lines of rank 1:\n  Killed")
    no_rank = failure_message(None, 2, {}, ["usage: horovodrun ...", "error: bad -H"])
    assert no_rank == (
        "horovodrun exited with status 2; its last lines:\n  usage: horovodrun ...\n  error: bad -H"
    )


def test_only_host_zero_of_a_rendezvous_job_goes_on_to_publish() -> None:
    assert PipelineConfig(num_proc=2).is_coordinator()  # horovodrun: this host holds rank 0
    assert PipelineConfig(num_proc=2, hosts=TWO_HOSTS, worker_index=0).is_coordinator()
    assert not PipelineConfig(num_proc=2, hosts=TWO_HOSTS, worker_index=1).is_coordinator()


def test_gloo_interface_is_the_one_that_routes_to_host_zero() -> None:
    addresses = [
        (name, address.address)
        for name, entries in psutil.net_if_addrs().items()
        for address in entries
        if address.family == socket.AF_INET
    ]
    assert ("lo", "127.0.0.1") in addresses
    for name, address in addresses:  # this machine's own addresses: routed via their interface
        assert route_interface(address) == name, address
