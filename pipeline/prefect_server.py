"""The Prefect API a run reports to: PREFECT_API_URL, or a local server that outlives runs.

Without PREFECT_API_URL, Prefect starts a temporary server inside every run and stops it at the
end (10-15 s a run here, and the run's record goes with it). `pipeline run --local-server` (what
`make run` uses) instead reuses a `prefect server` running in the background on 127.0.0.1, and
starts one when none answers. Its database, log and pid file live in PREFECT_HOME, so every
run stays in the UI with its logs and report. `pipeline server stop` (`make stop-server`) ends it.

This module must not import Prefect: it decides which API Prefect's client will talk to, and
Prefect reads PREFECT_API_URL when it is imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.base.errors import PipelineError

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
# A first start on a fresh machine (database migrations, cold imports) took 35-60 s here.
START_TIMEOUT_S = 180.0
HEALTH_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 20.0


class PrefectApiError(PipelineError):
    """The Prefect API cannot be reached or started."""


@dataclass(frozen=True)
class LocalServer:
    """A `prefect server` this tool started in the background."""

    pid: int
    port: int

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def prefect_home() -> Path:
    """Where Prefect keeps its state (its own default: ~/.prefect)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_file() -> Path:
    return prefect_home() / "pipeline-server.json"


def log_file() -> Path:
    return prefect_home() / "pipeline-server.log"


def api_problem(api_url: str, timeout: float = HEALTH_TIMEOUT_S) -> str | None:
    """None when the API at `api_url` answers its health check, else what went wrong."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", None) or exc)


def check_api(api_url: str) -> None:
    """Fail in one line, before any work, when the configured API does not answer."""
    problem = api_problem(api_url)
    if problem is not None:
        raise PrefectApiError(
            f"the Prefect API at PREFECT_API_URL={api_url} does not answer ({problem}); "
            "start that server, or unset PREFECT_API_URL to use a local one"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded_server() -> LocalServer | None:
    """The server this tool last started, as its state file records it (it may be gone)."""
    try:
        return LocalServer(**json.loads(state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running_server() -> LocalServer | None:
    """The background server this tool started, if it still runs and answers."""
    server = recorded_server()
    if server is not None and _alive(server.pid) and api_problem(server.api_url) is None:
        return server
    return None


def _server_command(port: int) -> list[str]:
    prefect = Path(sys.executable).with_name("prefect")
    return [str(prefect), "server", "start", "--host", HOST, "--port", str(port)]


def _log_tail(lines: int = 1) -> str:
    with suppress(OSError):
        tail = log_file().read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(line.strip() for line in tail)
    return "(no log)"


def start_server(port: int = DEFAULT_PORT, timeout: float = START_TIMEOUT_S) -> LocalServer:
    """The running local server, or a new one started in its own session (so that it outlives
    the shell, `make` and this process) and waited for until it answers."""
    server = running_server()
    if server is not None:
        return server
    if api_problem(f"http://{HOST}:{port}/api", timeout=1) is None:
        # Someone else's Prefect server on that port: use it, but it is not ours to stop.
        return LocalServer(pid=0, port=port)
    prefect_home().mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    # The UI asks /ui-settings where its API is; Prefect derives that from its own default port
    # (4200), not from `--port`, so on any other port the page "Can't connect to Server API".
    env["PREFECT_UI_API_URL"] = LocalServer(pid=0, port=port).api_url
    with log_file().open("ab") as log:
        process = subprocess.Popen(
            _server_command(port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LocalServer(pid=process.pid, port=port)
    state_file().write_text(json.dumps(asdict(server)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            state_file().unlink(missing_ok=True)
            raise PrefectApiError(
                f"the local Prefect server exited with status {process.returncode} while "
                f"starting: {_log_tail()} (log: {log_file()})"
            )
        if api_problem(server.api_url, timeout=2) is None:
            return server
        time.sleep(0.5)
    stop_server()
    raise PrefectApiError(
        f"the local Prefect server did not answer within {timeout:.0f} s "
        f"(log: {log_file()}); it was stopped"
    )


def stop_server() -> LocalServer | None:
    """Stop the background server this tool started; return it, or None if none ran."""
    server = recorded_server()
    if server is None:
        return None
    if server.pid and _alive(server.pid):
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(server.pid) and time.monotonic() < deadline:
            _reap(server.pid)
            time.sleep(0.2)
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        _reap(server.pid)
    state_file().unlink(missing_ok=True)
    return server


def _reap(pid: int) -> None:
    # A server started by this very process must be reaped, or it lingers as a zombie.
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def use_api(local_server: bool, port: int = DEFAULT_PORT) -> str | None:
    """Point this process's Prefect client at the API a run should use, before Prefect loads.

    PREFECT_API_URL set: that server, which must answer. Else, with `local_server`, the
    background server (started if needed). Else None: Prefect's temporary server."""
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        check_api(api_url)
        return api_url
    if not local_server:
        return None
    server = start_server(port)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url
