"""pytest plugin (loaded with -p in pyproject.toml): a real Prefect server for the tests.

`prefect_env` starts `prefect server start` on 127.0.0.1 at a free port with SQLite in a temp
dir, once a session (a start costs 10-30 s), and yields the environment that points at it;
`prefect_api` points this process's flows at it (instead of a temporary server per module);
`prefect` and `api` talk to it through the CLI and the REST API; `background` runs a
long-lived process that is always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.seaweedfs import free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
SERVER_START_S = 120


@contextmanager
def background(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A long-running process in its own session; it and its children are killed at the end."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)


def wait_for(condition, timeout: float, what: str, interval: float = 1.0):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Prefect server on 127.0.0.1 and the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PREFECT_"))}
    env = {
        **inherited,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # Let the scheduler create the nightly deployment's runs within the test's time.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PIPELINE_PROJECT_DIR": str(REPO),
    }
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, env, home / "server.log") as server:

        def healthy() -> bool:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(healthy, SERVER_START_S, "the Prefect server to answer /api/health")
        yield env


@pytest.fixture(scope="session")
def prefect_api(prefect_env: dict[str, str]) -> Iterator[str]:
    """Flows called in this process report to the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        yield prefect_env["PREFECT_API_URL"]


def prefect(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [PREFECT, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def api(env: dict[str, str], method: str, path: str, body: dict | None = None) -> dict | list:
    """The Prefect REST API, directly (no client state shared with this process)."""
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")
