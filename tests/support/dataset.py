"""Helpers of the dataset step's tests: a real HTTP mirror that can misbehave on demand, and
copies of a warm cache (fixtures: tests/tasks/dataset/conftest.py)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import textwrap
import threading
import time
from collections import Counter
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.base.config import PipelineConfig
from tasks import dataset
from tasks.dataset import (
    FILES,
    DataFile,
)
from tests.support import REPO

ROOT = REPO
DEBIAN_MIRROR = dataset.DEBIAN_DATA_DIR.as_uri() + "/"
SMALL = FILES["test_labels"]  # 5 KB of gzip: the file the mirror-failure tests fetch
STALL_SECONDS = 10  # how long the stalling mirror holds a connection (far above the timeout)
SLOW_SECONDS = 0.5  # delay before each response of the slow mirror (makes the race real)

# prepare_dataset in a fresh interpreter, as a second flow run or Horovod rank would run it.
CHILD = textwrap.dedent(
    """
    import logging, sys
    from pipeline.base.config import PipelineConfig
    from tasks.dataset import prepare_dataset
    logging.basicConfig(level=logging.INFO)
    print(prepare_dataset(PipelineConfig.model_validate_json(sys.argv[1])))
    """
)


def flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0x01])


class MirrorServer:
    """One HTTP server whose first path segment picks how the mirror behaves."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: Counter[tuple[str, str]] = Counter()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/"

    def count(self, mode: str, name: str) -> int:
        with self._lock:
            return self.requests[(mode, name)]

    @cache  # noqa: B019 (the server lives for the module; each corrupt copy is built once)
    def corrupt(self, name: str) -> bytes:
        """The file with one byte of its decompressed content flipped, gzipped again."""
        return gzip.compress(flip_last_byte(gzip.decompress(self.files[name])), compresslevel=1)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output quiet
                pass

            def send_body(self, body: bytes, length: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                _, mode, name = self.path.split("/", 2)
                with server._lock:
                    server.requests[(mode, name)] += 1
                    seen = server.requests[(mode, name)]
                body = server.files.get(name)
                if body is None or mode == "missing":
                    self.send_error(404)
                elif mode == "error" or (mode == "flaky" and seen == 1):
                    self.send_error(500)
                elif mode == "corrupt":
                    self.send_body(server.corrupt(name))
                elif mode == "truncated":
                    self.send_body(body[: len(body) // 2])
                elif mode == "stall":
                    self.send_body(body[: len(body) // 2], length=len(body))
                    self.wfile.flush()
                    server.release.wait(STALL_SECONDS)
                else:
                    if mode == "slow":
                        time.sleep(SLOW_SECONDS)
                    self.send_body(body)

        return Handler


def config_for(cache_dir: Path, *mirrors: str, **overrides) -> PipelineConfig:
    settings = {
        "mirrors": list(mirrors),
        "data_dir": cache_dir,
        "download_timeout": 1,
        "download_retries": 0,
    }
    return PipelineConfig(**(settings | overrides))


def copy_cache(warm_cache: Path, tmp_path: Path, *without: DataFile) -> Path:
    cache_dir = tmp_path / "cache"
    shutil.copytree(warm_cache, cache_dir)
    for spec in without:
        (cache_dir / spec.cached_name).unlink()
    return cache_dir


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def part_files(cache_dir: Path) -> list[Path]:
    return list(cache_dir.glob("*.part")) + list(cache_dir.glob(".*.part"))


def failure_logged(caplog, mirror: str, reason: str) -> bool:
    return any(mirror in r.getMessage() and reason in r.getMessage() for r in caplog.records)
