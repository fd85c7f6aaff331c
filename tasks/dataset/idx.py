"""Fashion-MNIST's files and the IDX format: the pure core of the dataset step.

`parse_idx` (IDX bytes -> validated array) and `inflate_gzip` (gzip stream -> file, with the
SHA-256 of the decompressed bytes) take untrusted bytes and check every size before use.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from math import prod
from typing import BinaryIO, NamedTuple

import numpy as np

from pipeline.base.errors import PipelineError

CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


class DataFile(NamedTuple):
    name: str  # file name on the mirrors, e.g. "train-images-idx3-ubyte.gz"
    sha256: str  # SHA-256 of the *decompressed* IDX content
    shape: tuple[int, ...]

    @property
    def cached_name(self) -> str:
        """The decompressed file's name in the cache."""
        return self.name.removesuffix(".gz")

    @property
    def nbytes(self) -> int:
        """Size of the decompressed IDX file: 4-byte magic, 4 bytes per dimension, the data."""
        return 4 + 4 * len(self.shape) + prod(self.shape)


# Pinned digests of the decompressed IDX files: the Debian copies are re-gzipped, so only the
# decompressed bytes are the same on every mirror.
FILES = {
    "train_images": DataFile(
        "train-images-idx3-ubyte.gz",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    "train_labels": DataFile(
        "train-labels-idx1-ubyte.gz",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        (60000,),
    ),
    "test_images": DataFile(
        "t10k-images-idx3-ubyte.gz",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    "test_labels": DataFile(
        "t10k-labels-idx1-ubyte.gz",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        (10000,),
    ),
}

GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip framing: zlib itself checks the trailer's CRC-32 and size


class DatasetError(PipelineError, RuntimeError):
    """The data set could not be fetched, verified or parsed; the message says which file."""


class CorruptDataError(DatasetError):
    """Bytes that are not the pinned data set file (bad gzip, bad IDX, wrong digest)."""


class FashionMNIST(NamedTuple):
    train_images: np.ndarray  # uint8 (60000, 28, 28)
    train_labels: np.ndarray  # uint8 (60000,)
    test_images: np.ndarray  # uint8 (10000, 28, 28)
    test_labels: np.ndarray  # uint8 (10000,)


# --- pure core ------------------------------------------------------------------------------


def parse_idx(
    raw: bytes | bytearray | memoryview, name: str, expected_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Parse an IDX (ubyte) file's decompressed bytes into a validated uint8 array.

    Checks the magic number (unsigned bytes, rank 1 or 3), that the data size matches the
    dimensions, the expected shape if given, and that labels (rank 1) lie in 0-9. The array
    shares memory with `raw`. Raises CorruptDataError naming `name`.
    """
    data = memoryview(raw)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CorruptDataError(
            f"{name}: bad IDX magic 0x{data[:4].hex()} (expected 0x00000801 for labels or "
            "0x00000803 for images)"
        )
    ndim = data[3]
    if ndim not in (1, 3):
        raise CorruptDataError(f"{name}: IDX rank {ndim}, expected 1 (labels) or 3 (images)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(f"{name}: IDX header cut short ({len(data)} of {header} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if expected_shape is not None and shape != expected_shape:
        raise CorruptDataError(f"{name}: IDX shape {shape}, expected {expected_shape}")
    if len(data) - header != prod(shape):
        raise CorruptDataError(
            f"{name}: {len(data) - header} data bytes for shape {shape} (expected {prod(shape)})"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    if ndim == 1 and array.size and array.max() > 9:
        bad = int(np.argmax(array > 9))
        raise CorruptDataError(f"{name}: label {int(array[bad])} at item {bad} is outside 0-9")
    return array


def inflate_gzip(chunks: Iterable[bytes], sink: BinaryIO, max_bytes: int) -> tuple[int, str]:
    """Decompress a gzip stream chunk by chunk into `sink`.

    Returns the decompressed size and the SHA-256 (hex) of the decompressed bytes, so a download
    is inflated, written and hashed in one pass. Concatenated gzip members are allowed (RFC
    1952). Raises CorruptDataError (the message names no file; callers add it) if the stream is
    not gzip, ends early, or inflates to more than `max_bytes` (a bomb stops right there).
    """
    digest = hashlib.sha256()
    size = 0
    inflater = zlib.decompressobj(GZIP_WBITS)
    for chunk in chunks:
        while chunk:
            if inflater.eof:  # another gzip member follows the one that just ended
                inflater = zlib.decompressobj(GZIP_WBITS)
            try:
                piece = inflater.decompress(chunk, max_bytes - size + 1)
            except zlib.error as exc:
                raise CorruptDataError(f"not valid gzip data ({exc})") from exc
            size += len(piece)
            if size > max_bytes:
                raise CorruptDataError(f"inflates to more than the expected {max_bytes} bytes")
            sink.write(piece)
            digest.update(piece)
            chunk = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if not inflater.eof:
        raise CorruptDataError(f"truncated gzip data (stream ends after {size} inflated bytes)")
    return size, digest.hexdigest()
