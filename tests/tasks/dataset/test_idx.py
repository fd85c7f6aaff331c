"""tasks/dataset/idx.py: the IDX format and gzip inflation (pure, real files)."""

from __future__ import annotations

import gzip
import hashlib
import io
from collections import Counter

import pytest

from tasks.dataset import (
    CorruptDataError,
    inflate_gzip,
    parse_idx,
)
from tests.support.dataset import SMALL

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
