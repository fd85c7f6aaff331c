"""The dataset step against real mirrors: the real Fashion-MNIST files served by a real HTTP
server on 127.0.0.1 (plus copies made bad in each way), Debian's file:// copy, and real
concurrent processes filling one cache."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from tasks import dataset
from tasks.dataset import (
    FILES,
    CorruptDataError,
    DataFile,
    DatasetError,
    cache_key,
    inflate_gzip,
    load_dataset,
    parse_idx,
    prepare_dataset,
    read_record,
)
from tasks.dataset import download as dataset_download
from tasks.dataset.download import CacheWriteError

ROOT = Path(__file__).resolve().parents[1]
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


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gz() -> dict[str, bytes]:
    """The real .gz files of Debian's dataset-fashion-mnist, by mirror file name."""
    if not (dataset.DEBIAN_DATA_DIR / SMALL.name).exists():
        pytest.skip(f"needs Debian's dataset-fashion-mnist in {dataset.DEBIAN_DATA_DIR}")
    return {
        spec.name: (dataset.DEBIAN_DATA_DIR / spec.name).read_bytes() for spec in FILES.values()
    }


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


@pytest.fixture(scope="module")
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


def config_for(cache_dir: Path, *mirrors: str, **overrides) -> PipelineConfig:
    settings = {
        "mirrors": list(mirrors),
        "data_dir": cache_dir,
        "download_timeout": 1,
        "download_retries": 0,
    }
    return PipelineConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def warm_cache(real_gz, tmp_path_factory) -> Path:
    """A complete cache filled once from Debian's file:// mirror; tests work on copies."""
    cache_dir = tmp_path_factory.mktemp("warm") / "cache"
    prepare_dataset(config_for(cache_dir, DEBIAN_MIRROR))
    return cache_dir


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


# --- pure core: IDX parsing and gzip inflation ----------------------------------------------


@pytest.fixture(scope="module")
def test_labels_idx(real_gz) -> bytes:
    return gzip.decompress(real_gz[SMALL.name])


def test_parse_idx_reads_the_real_labels(test_labels_idx):
    labels = parse_idx(test_labels_idx, "labels", SMALL.shape)
    assert labels.shape == SMALL.shape
    assert sorted(Counter(labels.tolist()).values()) == [1000] * 10  # balanced test set


def test_parse_idx_rejects_a_wrong_magic_number(test_labels_idx):
    raw = b"\x00\x00\x09\x01" + test_labels_idx[4:]  # 0x09: signed bytes, not ubyte
    with pytest.raises(CorruptDataError, match=r"^labels\.idx: bad IDX magic 0x00000901"):
        parse_idx(raw, "labels.idx")


def test_parse_idx_rejects_a_label_outside_0_to_9(test_labels_idx):
    raw = test_labels_idx[:-1] + b"\x0a"
    with pytest.raises(CorruptDataError, match=r"^labels\.idx: label 10 at item 9999 is outside"):
        parse_idx(raw, "labels.idx")


def test_parse_idx_rejects_an_item_count_that_does_not_match_the_data(test_labels_idx):
    with pytest.raises(CorruptDataError, match=r"^labels\.idx: 9999 data bytes for shape \(10000,"):
        parse_idx(test_labels_idx[:-1], "labels.idx")


def test_parse_idx_rejects_an_unexpected_shape(test_labels_idx):
    with pytest.raises(CorruptDataError, match=r"shape \(10000,\), expected \(60000,\)"):
        parse_idx(test_labels_idx, "labels.idx", (60000,))


def test_inflate_gzip_returns_size_and_digest_of_the_content(real_gz):
    sink = io.BytesIO()
    chunks = [real_gz[SMALL.name][i : i + 1000] for i in range(0, len(real_gz[SMALL.name]), 1000)]
    assert inflate_gzip(chunks, sink, SMALL.nbytes) == (SMALL.nbytes, SMALL.sha256)
    assert hashlib.sha256(sink.getvalue()).hexdigest() == SMALL.sha256


def test_inflate_gzip_accepts_concatenated_members(test_labels_idx):
    half = len(test_labels_idx) // 2
    stream = gzip.compress(test_labels_idx[:half]) + gzip.compress(test_labels_idx[half:])
    assert inflate_gzip([stream], io.BytesIO(), SMALL.nbytes) == (SMALL.nbytes, SMALL.sha256)


def test_inflate_gzip_rejects_a_truncated_stream(real_gz):
    gz = real_gz[SMALL.name]
    with pytest.raises(CorruptDataError, match="truncated gzip data"):
        inflate_gzip([gz[: len(gz) // 2]], io.BytesIO(), SMALL.nbytes)


def test_inflate_gzip_stops_at_max_bytes(test_labels_idx):
    with pytest.raises(CorruptDataError, match="more than the expected 100 bytes"):
        inflate_gzip([gzip.compress(test_labels_idx)], io.BytesIO(), 100)


# --- mirrors --------------------------------------------------------------------------------


def test_file_mirror_fills_an_empty_cache_with_verified_files(warm_cache):
    record = read_record(warm_cache.as_uri())
    assert record["cache"] == str(warm_cache)
    for spec in FILES.values():
        assert sha256(warm_cache / spec.cached_name) == spec.sha256
        assert record["files"][spec.name] == {"sha256": spec.sha256, "mirror": DEBIAN_MIRROR}
    assert not part_files(warm_cache)


def test_refused_mirror_falls_back_to_the_next_and_logs_why(
    server, refused_mirror, warm_cache, tmp_path, caplog
):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with caplog.at_level(logging.WARNING, logger="tasks.dataset"):
        uri = prepare_dataset(config_for(cache_dir, refused_mirror, server.url("good")))
    assert failure_logged(caplog, refused_mirror, "Connection refused")
    assert read_record(uri)["files"][SMALL.name]["mirror"] == server.url("good")
    assert server.count("good", SMALL.name) == 1
    assert sha256(cache_dir / SMALL.cached_name) == SMALL.sha256


@pytest.mark.parametrize(
    ("mode", "reason", "requests"),
    [("missing", "HTTP 404", 1), ("error", "HTTP 500", 2)],  # 500 is retried, 404 is not
)
def test_http_error_moves_on_to_the_next_mirror(
    server, warm_cache, tmp_path, caplog, mode, reason, requests
):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    config = config_for(cache_dir, server.url(mode), DEBIAN_MIRROR, download_retries=1)
    with caplog.at_level(logging.WARNING, logger="tasks.dataset"):
        uri = prepare_dataset(config)
    assert server.count(mode, SMALL.name) == requests
    assert failure_logged(caplog, server.url(mode), reason)
    assert read_record(uri)["files"][SMALL.name]["mirror"] == DEBIAN_MIRROR


def test_transient_error_is_retried_on_the_same_mirror(server, warm_cache, tmp_path, caplog):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with caplog.at_level(logging.WARNING, logger="tasks.dataset"):
        uri = prepare_dataset(config_for(cache_dir, server.url("flaky"), download_retries=1))
    assert server.count("flaky", SMALL.name) == 2
    assert any("retry 1 of 1" in record.getMessage() for record in caplog.records)
    assert read_record(uri)["files"][SMALL.name]["mirror"] == server.url("flaky")


def test_corrupt_mirror_is_rejected_by_digest_and_nothing_is_cached(server, warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with pytest.raises(DatasetError, match="SHA-256 .* does not match the pinned"):
        prepare_dataset(config_for(cache_dir, server.url("corrupt")))
    assert server.count("corrupt", SMALL.name) == 1
    assert not (cache_dir / SMALL.cached_name).exists()
    assert not part_files(cache_dir)


def test_corrupt_mirror_is_followed_by_the_next_mirror(server, warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    uri = prepare_dataset(config_for(cache_dir, server.url("corrupt"), server.url("good")))
    assert server.count("corrupt", SMALL.name) == 1
    assert read_record(uri)["files"][SMALL.name]["mirror"] == server.url("good")
    assert sha256(cache_dir / SMALL.cached_name) == SMALL.sha256


def test_truncated_gzip_is_rejected_naming_the_file(server, warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with pytest.raises(DatasetError, match=rf"^{re.escape(SMALL.name)}: .*truncated gzip data"):
        prepare_dataset(config_for(cache_dir, server.url("truncated")))
    assert not (cache_dir / SMALL.cached_name).exists()


@pytest.mark.timeout(60)
def test_stalled_mirror_hits_the_read_timeout_and_the_next_is_used(
    server, warm_cache, tmp_path, caplog
):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with caplog.at_level(logging.WARNING, logger="tasks.dataset"):
        uri = prepare_dataset(config_for(cache_dir, server.url("stall"), server.url("good")))
    # "timed out", not "connection closed": the client gave up, the server was still stalling.
    assert failure_logged(caplog, server.url("stall"), "timed out (no data for 1 s)")
    assert read_record(uri)["files"][SMALL.name]["mirror"] == server.url("good")
    assert not part_files(cache_dir)


def test_every_mirror_failing_gives_one_error_listing_each(
    server, refused_mirror, warm_cache, tmp_path
):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    absent_dir = (tmp_path / "no-such-mirror").as_uri() + "/"
    reasons = {
        refused_mirror: "Connection refused",
        server.url("missing"): "HTTP 404",
        server.url("error"): "HTTP 500",
        absent_dir: "No such file or directory",
    }
    with pytest.raises(DatasetError) as failure:
        prepare_dataset(config_for(cache_dir, *reasons))
    message = str(failure.value)
    assert message.startswith(f"{SMALL.name}: every mirror failed: ")
    assert "\n" not in message
    for mirror, reason in reasons.items():
        assert re.search(re.escape(mirror) + r" \([^)]*" + re.escape(reason), message), mirror
    assert "apt-get install" not in message  # Debian's copy is installed on this machine


def test_without_the_debian_package_the_error_suggests_installing_it(
    server, refused_mirror, warm_cache, tmp_path, monkeypatch
):
    # A test cannot uninstall the package; pointing its location at an empty place is its absence.
    monkeypatch.setattr(dataset_download, "DEBIAN_DATA_DIR", tmp_path / "not-installed")
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist"):
        prepare_dataset(config_for(cache_dir, refused_mirror))


# --- cache ----------------------------------------------------------------------------------


def test_warm_cache_makes_no_request_and_keeps_the_original_mirrors(server, warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path)
    config = config_for(cache_dir, server.url("good"))
    uri = prepare_dataset(config)  # the copy is a moved cache: its record gets the new location
    assert read_record(uri)["cache"] == str(cache_dir)
    record_mtime = (cache_dir / layout.DATASET_RECORD).stat().st_mtime_ns
    key = cache_key(config)
    assert prepare_dataset(config) == uri
    assert sum(server.requests.values()) == 0
    assert {f["mirror"] for f in read_record(uri)["files"].values()} == {DEBIAN_MIRROR}
    # Nothing rewritten, so the next flow run's cache key matches this one's.
    assert (cache_dir / layout.DATASET_RECORD).stat().st_mtime_ns == record_mtime
    assert cache_key(config) == key


def test_damaged_cached_file_is_detected_and_fetched_again(server, warm_cache, tmp_path, caplog):
    cache_dir = copy_cache(warm_cache, tmp_path)
    damaged = cache_dir / SMALL.cached_name
    damaged.write_bytes(flip_last_byte(damaged.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="tasks.dataset"):
        uri = prepare_dataset(config_for(cache_dir, server.url("good")))
    assert any("not the pinned one; fetching it again" in r.getMessage() for r in caplog.records)
    assert dict(server.requests) == {("good", SMALL.name): 1}
    assert sha256(damaged) == SMALL.sha256
    assert read_record(uri)["files"][SMALL.name]["mirror"] == server.url("good")


def test_two_processes_filling_one_cache_download_each_file_once(server, tmp_path):
    cache_dir = tmp_path / "cache"
    config = config_for(cache_dir, server.url("slow"), download_timeout=30)
    command = [sys.executable, "-c", CHILD, config.model_dump_json()]
    children = [
        subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {cache_dir.as_uri()}
    # One child waited for the other's lock: the two really did run at the same time.
    assert sum("waiting for its lock" in err for _, err in outputs) == 1, outputs
    assert dict(server.requests) == {("slow", spec.name): 1 for spec in FILES.values()}
    assert not part_files(cache_dir)
    data = load_dataset(cache_dir.as_uri())
    assert data.train_images.shape == FILES["train_images"].shape


def test_a_cache_directory_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    config = config_for(tmp_path / "a-file" / "cache", DEBIAN_MIRROR)
    with pytest.raises(DatasetError, match=r"^dataset cache .*a-file/cache: cannot create it"):
        prepare_dataset(config)


def test_offline_with_an_empty_cache_is_a_clear_error(tmp_path):
    config = config_for(tmp_path / "never-filled", offline=True)
    with pytest.raises(DatasetError, match=r"offline mode: dataset cache .*never-filled does not"):
        prepare_dataset(config)


def test_offline_with_a_damaged_cache_names_the_files(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    labels = cache_dir / FILES["train_labels"].cached_name
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(DatasetError) as failure:
        prepare_dataset(config_for(cache_dir, offline=True))
    message = str(failure.value)
    assert f"{SMALL.name} is missing" in message
    assert f"{FILES['train_labels'].name} has 60007 bytes, expected 60008" in message


def test_offline_with_a_warm_cache_needs_no_mirror(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path)
    assert prepare_dataset(config_for(cache_dir, offline=True)) == cache_dir.as_uri()


def test_cache_key_changes_when_a_cached_file_is_touched_or_deleted(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path)
    config = config_for(cache_dir, DEBIAN_MIRROR)
    key = cache_key(config)
    assert cache_key(config) == key
    labels = cache_dir / SMALL.cached_name
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = cache_key(config)
    assert touched != key
    labels.unlink()
    # An incomplete cache never gets a key that a run could have stored a result under.
    assert len({touched, cache_key(config), cache_key(config)}) == 3


# --- loading --------------------------------------------------------------------------------


def test_load_dataset_returns_the_verified_arrays(warm_cache):
    data = load_dataset(warm_cache.as_uri())
    for key, spec in FILES.items():
        array = getattr(data, key)
        assert array.shape == spec.shape and str(array.dtype) == "uint8"
    assert sorted(Counter(data.train_labels.tolist()).values()) == [6000] * 10
    assert data.train_images.max() == 255 and data.train_images.min() == 0


def test_load_dataset_names_a_file_with_a_label_outside_0_to_9(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path)
    labels = cache_dir / SMALL.cached_name
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x0c")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(labels))}: label 12 at item 9999"):
        load_dataset(cache_dir.as_uri())


def test_load_dataset_names_a_file_with_a_wrong_magic_number(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path)
    images = cache_dir / FILES["test_images"].cached_name
    images.write_bytes(b"\x00\x00\x08\x02" + images.read_bytes()[4:])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(images))}: IDX rank 2"):
        load_dataset(cache_dir.as_uri())


def test_load_dataset_rejects_a_file_that_fails_its_digest(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path)
    images = cache_dir / FILES["test_images"].cached_name
    images.write_bytes(flip_last_byte(images.read_bytes()))  # still a well-formed IDX file
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(images))}: SHA-256 .*pipeline dataset"
    ):
        load_dataset(cache_dir.as_uri())


def test_load_dataset_names_a_missing_file(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path, SMALL)
    with pytest.raises(DatasetError, match=rf"{SMALL.cached_name}: cannot read .*pipeline dataset"):
        load_dataset(cache_dir.as_uri())


# --- progress bar ---------------------------------------------------------------------------


def test_no_progress_output_when_stderr_is_not_a_terminal(server, warm_cache, tmp_path, capfd):
    cache_dir = copy_cache(warm_cache, tmp_path, FILES["train_labels"])
    prepare_dataset(config_for(cache_dir, server.url("good")))
    assert server.count("good", FILES["train_labels"].name) == 1
    assert capfd.readouterr().err == ""


def read_terminal(master: int, child: subprocess.Popen, seconds: float) -> str:
    """Everything the child writes to its terminal until it exits (at most `seconds`)."""
    output = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif child.poll() is not None:
            break
    return output.decode(errors="replace")


def test_progress_bar_with_bytes_and_rate_on_a_terminal(server, warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path, FILES["train_labels"])
    config = config_for(cache_dir, server.url("good"))
    master, terminal = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, config.model_dump_json()],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        shown = read_terminal(master, child, seconds=60)
        assert child.wait(timeout=60) == 0, shown
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
    # The last redraw: all bytes of the file received, and the rate.
    assert re.search(r"train-labels-idx1-ubyte\.gz  ([0-9.]+ kB) / \1  [0-9.]+ [kMG]?B/s", shown)


# --- a full disk (issue 15, item 11) ----------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: the first dataset file (its 60,008 B fit, 26 MB do not) fills it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False, timeout=30)


@pytest.mark.timeout(180)
def test_a_full_disk_is_one_attempt_not_retried(server: MirrorServer, tiny_disk: Path) -> None:
    """ENOSPC is the cache's fault, not the mirror's: no retry, no next mirror, no Prefect retry."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.flow import dataset_step

    config = PipelineConfig(
        mirrors=[server.url("first"), server.url("second")],
        data_dir=tiny_disk / "cache",
        download_retries=3,
    )

    @flow(retries=0)
    def dataset_only() -> str:
        return dataset_step(config)

    with prefect_test_harness(server_startup_timeout=120), pytest.raises(CacheWriteError) as info:
        dataset_only()
    message = str(info.value)
    assert "No space left on device" in message and str(tiny_disk / "cache") in message
    assert server.requests and all(count == 1 for count in server.requests.values()), (
        server.requests
    )
    assert not any(mode == "second" for mode, _ in server.requests), server.requests
    assert not [p for p in (tiny_disk / "cache").rglob("*.part")]  # nothing half-written left
