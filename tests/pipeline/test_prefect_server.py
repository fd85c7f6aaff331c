"""pipeline/prefect_server.py through the CLI: `pipeline run` against a running server, a
temporary one, or the local server it keeps; their failures are one error line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.prefect_server import REPO, api
from tests.support.seaweedfs import free_port

pytestmark = pytest.mark.integration  # `pipeline` subprocesses and Prefect servers

PIPELINE = str(Path(sys.executable).with_name("pipeline"))
DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
RUN_TIMEOUT_S = 600


def pipeline(env: dict[str, str], *args: str, timeout: float = RUN_TIMEOUT_S):
    return subprocess.run(
        [PIPELINE, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without Prefect or pipeline settings, with its own PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PREFECT_"))}
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PIPELINE_MIRRORS": f'["{DEBIAN_MIRROR}"]',
        "PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "PIPELINE_WORK_DIR": str(tmp_path / "work"),
        "PIPELINE_ARTIFACT_STORE": (tmp_path / "store").as_uri(),
        **extra,
    }


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


def descendants_left(pid: int) -> list[str]:
    try:
        return [" ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# --- against a real running server ---------------------------------------------------------


def test_run_against_a_running_server_records_its_report_and_full_progress(prefect_env, tmp_path):
    env = {**clean_env(tmp_path), **prefect_env, "PIPELINE_EPOCHS": "2"}
    env["PIPELINE_MIN_TEST_ACCURACY"] = "0.5"
    result = pipeline(env, "run")
    assert result.returncode == 0, result.stderr[-3000:]
    ui_line = next(line for line in result.stdout.splitlines() if "prefect ui" in line)
    flow_run_id = ui_line.rsplit("/", 1)[-1]
    assert ui_line.split()[-1].startswith(prefect_env["PREFECT_API_URL"].removesuffix("/api"))

    flow_run = api(prefect_env, "GET", f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    artifacts = api(
        prefect_env,
        "POST",
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
    )
    by_key = {artifact["key"]: artifact for artifact in artifacts}
    assert by_key["evaluation-report"]["type"] == "markdown"
    assert "quality gate" in by_key["evaluation-report"]["description"]
    progress = by_key["training-progress"]
    assert progress["type"] == "progress"
    assert float(progress["data"]) == pytest.approx(100.0)


def test_an_api_that_does_not_answer_is_one_error_line_before_any_work(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/api"
    result = pipeline(clean_env(tmp_path, PREFECT_API_URL=dead), "run", timeout=120)
    line = one_error_line(result)
    assert dead in line and "does not answer" in line
    assert not (tmp_path / "data").exists(), "the dataset step ran before the API was checked"


def test_a_temporary_server_that_does_not_start_in_time_is_one_error_line(tmp_path):
    # The real temporary server, given no time to answer: what a cold machine did with 20 s.
    env = clean_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    process = subprocess.Popen(
        [PIPELINE, "run", "--epochs", "1"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    line = one_error_line(result)
    assert "temporary API server did not start" in line and "--local-server" in line
    assert descendants_left(process.pid) == []


# --- the local background server ----------------------------------------------------------------


def test_local_server_starts_once_is_reused_and_stops_leaving_nothing(tmp_path):
    port = str(free_port())
    env = clean_env(tmp_path, PIPELINE_PREFECT_PORT=port)
    started = pipeline(env, "server", "start", timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"http://127.0.0.1:{port}" in started.stdout
        # Issue 22, item 6: the UI it serves talks to this server's API, not to port 4200's.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=30) as reply:
            assert json.load(reply)["api_url"] == f"http://127.0.0.1:{port}/api"
        status = pipeline(env, "server", "status", timeout=60)
        assert status.returncode == 0, status.stderr
        pid = int(status.stdout.rsplit("pid ", 1)[1].rstrip(")\n"))
        assert psutil.pid_exists(pid)
        again = pipeline(env, "server", "start", timeout=120)  # answers: reused, not restarted
        assert again.returncode == 0 and pipeline(env, "server", "status").stdout == status.stdout
        # It runs in its own session: a shell (or make) that started it can go away.
        assert os.getsid(pid) == pid
    finally:
        stopped = pipeline(env, "server", "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert pipeline(env, "server", "status").returncode == 1


def test_local_server_that_cannot_start_is_one_error_line(tmp_path):
    # A port held by something that is not a Prefect server: the server exits on start.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        env = clean_env(tmp_path, PIPELINE_PREFECT_PORT=port)
        result = pipeline(env, "run", "--local-server", timeout=300)
    line = one_error_line(result)
    assert "local Prefect server" in line and "pipeline-server.log" in line
    assert not (tmp_path / "prefect-home" / "pipeline-server.json").exists()


def test_stopping_when_no_server_runs_says_so(tmp_path):
    result = pipeline(clean_env(tmp_path), "server", "stop", timeout=60)
    assert result.returncode == 0 and "no local Prefect server" in result.stdout
