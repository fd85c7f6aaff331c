"""tasks/train/rendezvous.py: two-host rendezvous jobs on loopback (worker_index set: no
horovodrun, no ssh), and the Gloo interface."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import tasks.train.step as train_module
from tasks.train.errors import TrainingError
from tasks.train.rendezvous import RENDEZVOUS_RETRY_S, route_interface
from tests.support.seaweedfs import free_port
from tests.support.steps import trained
from tests.support.train import (
    DEADLINE_S,
    LOGGING_TRAIN_SCRIPT,
    finish,
    history,
    job_config,
    job_hosts,
    parameters,
    rank_processes,
    run_config,
    start_host,
    wait_until_no_ranks,
)


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


def without_seconds(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


@pytest.mark.integration
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


@pytest.mark.integration
def test_a_host_started_before_host_zero_waits_for_its_rendezvous(
    tmp_path: Path, data_uri: str
) -> None:
    """Host 1 alone reaches its rendezvous wait (its log line says so: the event waited for,
    at most DEADLINE_S), and through RENDEZVOUS_RETRY_S more, a refused connection and a retry,
    it neither gives up nor starts a rank; then host 0 comes and both finish."""
    port = free_port()
    host_zero, host_one = configs = [
        job_config(tmp_path, index, port, epochs=1) for index in (0, 1)
    ]
    with job_hosts(configs) as hosts:
        hosts.append(start_host(host_one, data_uri, LOGGING_TRAIN_SCRIPT))
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in hosts[0].stderr])
        reader.start()
        seen: list[str] = []
        deadline = time.monotonic() + DEADLINE_S
        while not any("host 1: joining the Gloo rendezvous" in line for line in seen):
            assert time.monotonic() < deadline, f"host 1 never reached its rendezvous: {seen}"
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
            assert hosts[0].poll() is None or not lines.empty(), f"host 1 ended: {seen}"
        waiting_until = time.monotonic() + RENDEZVOUS_RETRY_S
        while time.monotonic() < waiting_until + 0.5:  # past one refused connection and retry
            assert hosts[0].poll() is None, f"host 1 gave up alone: {seen}"
            assert rank_processes(host_one.run_dir().resolve()) == [], "rank 1 started alone"
            time.sleep(0.1)
        hosts.append(start_host(host_zero, data_uri))
        code, _, err = finish(hosts[1])
        assert code == 0, err
        assert hosts[0].wait(timeout=DEADLINE_S) == 0, "".join(seen)
        reader.join(timeout=DEADLINE_S)
    summary = json.loads((host_zero.run_dir() / "metrics" / "train.json").read_text())
    assert (summary["epochs"], summary["num_proc"]) == (1, 2)


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_a_host_zero_whose_rendezvous_port_is_taken_fails_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            TrainingError, match=rf"cannot serve the Gloo rendezvous on port {port}: .*in use"
        ):
            trained(job_config(tmp_path, 0, port), "file:///nowhere")


@pytest.mark.integration
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
