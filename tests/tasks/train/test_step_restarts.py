"""tasks/train/step.py with a rank killed or failing: restarts from the last checkpoint,
resumes, and no rank left behind."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.base.store import open_store
from tasks.train import mpirun
from tasks.train.errors import TrainingError
from tests.support.steps import for_run, trained
from tests.support.train import (
    DEADLINE_S,
    TRAIN_SCRIPT,
    Capture,
    history,
    parameters,
    rank_number,
    rank_processes,
    run_config,
    wait_until_no_ranks,
)

pytestmark = pytest.mark.integration  # real horovodrun trainings, ranks killed


def _kill_rank_one_after_first_epoch(run_dir: Path, outcome: dict) -> None:
    """SIGKILL rank 1 as soon as epoch 1 is reported (bounded in time)."""
    jsonl = run_dir / "metrics" / "train.jsonl"
    deadline = time.monotonic() + DEADLINE_S
    rank_one = None
    while time.monotonic() < deadline:
        if rank_one is None:
            for process in rank_processes(run_dir):
                try:
                    if rank_number(process.environ()) == "1":
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
    "if {'HOROVOD_RANK', 'OMPI_COMM_WORLD_RANK'} & set(os.environ):\n"
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


def test_a_sigkilled_launcher_leaves_no_mpirun_and_no_ranks_behind(
    work_dir: Path, data_uri: str
) -> None:
    """SIGKILL runs nothing of the launcher: mpirun, between it and the ranks, stays their
    parent. The ranks watch the launcher's pid, end, and mpirun ends with them."""
    if not mpirun.available():
        pytest.skip("Horovod without MPI or no mpirun here: this host's ranks use Gloo")
    config = run_config(work_dir, "sigkilled", num_proc=2, epochs=200)
    run_dir = config.run_dir().resolve()
    command = [sys.executable, "-c", TRAIN_SCRIPT, config.model_dump_json(), data_uri]
    launcher = subprocess.Popen(command)
    launched: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(rank_processes(run_dir)) < 2:
            assert time.monotonic() < deadline, "the ranks did not start in time"
            assert launcher.poll() is None, "the launcher ended before it was killed"
            time.sleep(0.1)
        launched = psutil.Process(launcher.pid).children(recursive=True)
        assert any(p.name() == "mpirun" for p in launched), [p.name() for p in launched]
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs(launched, timeout=30)
        assert alive == [], f"outlived their SIGKILLed launcher: {alive}"
    finally:
        for process in [*launched, *rank_processes(run_dir)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
