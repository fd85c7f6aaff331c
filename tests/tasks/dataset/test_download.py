"""tasks/dataset/download.py: files from an ordered list of real mirrors: fallbacks,
retries, digests, timeouts, progress, a full disk."""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from tasks.dataset import (
    FILES,
    DatasetError,
    prepare_dataset,
    read_record,
)
from tasks.dataset import download as dataset_download
from tasks.dataset.download import CacheWriteError
from tests.support.dataset import (
    CHILD,
    DEBIAN_MIRROR,
    ROOT,
    SMALL,
    MirrorServer,
    config_for,
    copy_cache,
    failure_logged,
    part_files,
    sha256,
)

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


# --- a full disk ------------------------------------------------------------------------------


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


@pytest.mark.integration
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
