"""What the dataset tests share: the real small files, a mirror serving them, a refused
mirror, a warm cache."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tasks import dataset
from tasks.dataset import (
    FILES,
    prepare_dataset,
)
from tests.support.dataset import DEBIAN_MIRROR, SMALL, MirrorServer, config_for

# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_gz() -> dict[str, bytes]:
    """The real .gz files of Debian's dataset-fashion-mnist, by mirror file name."""
    if not (dataset.DEBIAN_DATA_DIR / SMALL.name).exists():
        pytest.skip(f"needs Debian's dataset-fashion-mnist in {dataset.DEBIAN_DATA_DIR}")
    return {
        spec.name: (dataset.DEBIAN_DATA_DIR / spec.name).read_bytes() for spec in FILES.values()
    }


@pytest.fixture(scope="session")
def mirror_server(real_gz):
    server = MirrorServer(real_gz)
    server.thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


@pytest.fixture
def server(mirror_server) -> MirrorServer:
    with mirror_server._lock:
        mirror_server.requests.clear()
    return mirror_server


@pytest.fixture
def refused_mirror():
    # A socket bound but never listening: every connection to its port is refused.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


@pytest.fixture(scope="session")
def warm_cache(real_gz, tmp_path_factory) -> Path:
    """A complete cache filled once from Debian's file:// mirror; tests work on copies."""
    cache_dir = tmp_path_factory.mktemp("warm") / "cache"
    prepare_dataset(config_for(cache_dir, DEBIAN_MIRROR))
    return cache_dir
