"""tasks/dataset/cache.py: the verified cache, offline use, its Prefect cache key, and
load_dataset."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from pipeline.base import layout
from tasks.dataset import (
    FILES,
    DatasetError,
    cache_key,
    load_dataset,
    prepare_dataset,
    read_record,
)
from tests.support.dataset import (
    CHILD,
    DEBIAN_MIRROR,
    ROOT,
    SMALL,
    config_for,
    copy_cache,
    flip_last_byte,
    part_files,
    sha256,
)

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


@pytest.mark.integration
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
