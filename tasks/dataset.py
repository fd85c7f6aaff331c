"""Dataset step: Fashion-MNIST from an ordered list of mirrors, verified, cached.

Pure core: `parse_idx` (IDX bytes -> validated array), `inflate_gzip` (gzip stream -> file,
with the SHA-256 of the decompressed bytes).
Shell: `prepare_dataset` (mirrors -> verified cache, returns the cache's file:// URI),
`load_dataset` (cache URI -> arrays), `read_record` (the cache's lineage record) and
`cache_key` (the Prefect task's cache key).

The cache holds the *decompressed* IDX files (`train-images-idx3-ubyte`, ...), because the pinned
SHA-256 digests are of the decompressed content (Debian's copies are re-gzipped) and because
inflating 30 MB of gzip costs several times more than hashing 55 MB (bench/dataset_speed.py).

Safety rests on one rule: bytes are used only after their SHA-256 matched the pin. A download is
inflated once, into a temporary file in the cache while it is hashed, and renamed into place only
if the digest matches. A warm cache is re-hashed by `prepare_dataset` (a damaged file is fetched
again), and `load_dataset` hashes the very bytes it parses. Size and mtime are never trusted for
correctness: `cache_key` uses them only to let Prefect skip the step, and the load still verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.client import HTTPException
from math import prod
from pathlib import Path
from typing import BinaryIO, NamedTuple
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname, urlopen

import numpy as np
from filelock import FileLock, Timeout

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

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

RECORD_NAME = "dataset.json"
LOCK_NAME = ".dataset.lock"
PART_SUFFIX = ".part"  # temporary files; only the lock holder writes them
UNKNOWN_MIRROR = "unknown (already in the cache)"
MISSING = "is missing"
# Where Debian's dataset-fashion-mnist package puts its copy (the last default mirror).
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_HINT = (
    "no local copy either: `apt-get install dataset-fashion-mnist` provides one at "
    f"{DEBIAN_DATA_DIR.as_uri()}/ (a default mirror)"
)

CHUNK_BYTES = 1 << 20
GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip framing: zlib itself checks the trailer's CRC-32 and size
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_SECONDS = 0.5  # first retry delay; doubles per retry
BACKOFF_MAX_SECONDS = 10.0


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


# --- shell: cache ---------------------------------------------------------------------------


def _cache_path(config: PipelineConfig) -> Path:
    return _cache_dir(config.data_uri())


def _cache_dir(data_uri: str) -> Path:
    parsed = urlparse(data_uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme:
        raise DatasetError(f"dataset URI {data_uri!r}: expected a file:// URI or a local path")
    return Path(data_uri)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # Inside a Prefect run, log to the run's logger (it reaches the UI); elsewhere plain logging.
    # Importing prefect takes a second, so ask only when it is loaded (a run implies it is).
    if "prefect" in sys.modules:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    return logging.getLogger(__name__)


@contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's lock file: one process fills the cache, others wait and then reuse it."""
    lock = FileLock(cache / LOCK_NAME)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _logger().info("%s: another process is filling this cache; waiting for its lock", cache)
            lock.acquire()
    except OSError as exc:
        raise DatasetError(
            f"dataset cache {cache}: cannot take its lock file {LOCK_NAME} ({exc}); "
            "the cache directory must be writable"
        ) from exc
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _atomic_writer(target: Path) -> Iterator[BinaryIO]:
    """A temporary file next to `target` that replaces it only if the block completes.

    Readers see the old file or the complete new one, never a partial one; on any error the
    temporary file is removed, so nothing half-written or unverified is ever left in the cache.
    """
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=PART_SUFFIX, delete=False
    ) as tmp:
        try:
            yield tmp
            tmp.flush()
            os.fchmod(tmp.fileno(), 0o644)  # mkstemp's 0600 would hide a shared cache
            os.fsync(tmp.fileno())  # data on disk before the rename makes it visible
            os.replace(tmp.name, target)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise


def _cache_problem(path: Path, spec: DataFile) -> str | None:
    """Why the cached copy of `spec` cannot be used, or None when its SHA-256 matches the pin."""
    try:
        size = path.stat().st_size
        if size != spec.nbytes:
            return f"has {size} bytes, expected {spec.nbytes}"
        with path.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"is unreadable ({exc.strerror})"
    return None if digest == spec.sha256 else f"has SHA-256 {digest[:16]}…, not the pinned one"


def _read_record_file(cache: Path) -> dict:
    try:
        return json.loads((cache / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}  # no (readable) record yet: it is rebuilt from the verified files


def cache_key(config: PipelineConfig) -> str:
    """The Prefect cache key of the dataset step for this config.

    Derived from the cache location, the pinned digests and a cheap signature (size, mtime) of
    every cached file and of the record: a second run reuses a warm cache without re-hashing,
    while a touched, replaced or deleted file changes the key, so the step runs and re-checks.
    An incomplete cache gets a key never seen before: a run that filled it must not be reused
    once it is gone again.
    """
    cache = _cache_path(config)
    parts = [str(cache), *(spec.sha256 for spec in FILES.values())]
    for name in [*(spec.cached_name for spec in FILES.values()), RECORD_NAME]:
        try:
            stat = (cache / name).stat()
        except OSError:
            return f"dataset-incomplete-{uuid.uuid4().hex}"
        parts.append(f"{name} {stat.st_size} {stat.st_mtime_ns}")
    return "dataset-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --- shell: download ------------------------------------------------------------------------


def _bytes(count: float) -> str:
    for unit in ("B", "kB", "MB"):
        if count < 1000:
            return f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


class _ProgressBar:
    """`name  12.3 MB / 26.4 MB  8.1 MB/s`, redrawn in place on stderr.

    Drawn only when stderr is a terminal, so logs and CI output stay clean.
    """

    def __init__(self, label: str, total_bytes: int | None) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.enabled = sys.stderr.isatty()
        self.started = self.drawn = time.monotonic()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if self.enabled and time.monotonic() - self.drawn >= 0.1:
            self._draw()

    def _draw(self) -> None:
        self.drawn = time.monotonic()
        rate = self.done_bytes / max(self.drawn - self.started, 1e-3)
        total = f" / {_bytes(self.total_bytes)}" if self.total_bytes else ""
        line = f"{self.label}  {_bytes(self.done_bytes)}{total}  {_bytes(rate)}/s"
        sys.stderr.write(f"\r{line}\x1b[K")  # ESC[K: clear the rest of a longer old line
        sys.stderr.flush()


def _body(response: BinaryIO, length: int | None, progress: _ProgressBar) -> Iterator[bytes]:
    """The response body in chunks; a body cut short of its Content-Length is an error."""
    received = 0
    while chunk := response.read(CHUNK_BYTES):
        received += len(chunk)
        progress.advance(len(chunk))
        yield chunk
    if length is not None and received < length:
        raise ConnectionError(f"connection closed after {received} of {length} bytes")


def _download(url: str, spec: DataFile, target: Path, timeout: float) -> None:
    """Stream `url` (http, https or file) inflated into `target`, only if it is the pinned file."""
    # `timeout` bounds the connect and every read: a mirror that stalls mid-body raises.
    with urlopen(url, timeout=timeout) as response, _atomic_writer(target) as sink:
        header = response.headers.get("Content-Length", "")
        length = int(header) if header.isdigit() else None
        with _ProgressBar(spec.name, length) as bar:
            size, digest = inflate_gzip(_body(response, length, bar), sink, spec.nbytes)
        if size != spec.nbytes:
            raise CorruptDataError(f"inflates to {size} bytes, expected {spec.nbytes}")
        if digest != spec.sha256:
            raise CorruptDataError(
                f"inflated SHA-256 {digest[:16]}… does not match the pinned {spec.sha256[:16]}…"
            )


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return f"timed out (no data for {timeout:g} s)"
    return str(exc) or type(exc).__name__


def _transient(exc: BaseException, scheme: str) -> bool:
    """Whether retrying the same mirror may help."""
    if scheme == "file":
        return False  # a local file does not appear or heal by waiting
    if isinstance(exc, HTTPError):
        return exc.code in RETRY_STATUS
    # Refused, reset, timed out, cut short: networks recover. Not a host name that DNS says
    # does not exist: waiting will not change that answer.
    return not (isinstance(exc, URLError) and getattr(exc.reason, "errno", 0) == socket.EAI_NONAME)


def _unreachable(exc: BaseException, scheme: str) -> bool:
    """Whether the mirror itself could not be reached (not worth trying for the next file)."""
    return isinstance(exc, URLError) and not isinstance(exc, HTTPError) and scheme != "file"


def _fetch_with_retries(url: str, spec: DataFile, target: Path, config: PipelineConfig) -> None:
    scheme = urlparse(url).scheme
    for attempt in range(config.download_retries + 1):
        try:
            _download(url, spec, target, config.download_timeout)
            return
        except (OSError, HTTPException) as exc:
            if attempt == config.download_retries or not _transient(exc, scheme):
                raise
            delay = min(BACKOFF_SECONDS * 2**attempt, BACKOFF_MAX_SECONDS)
            _logger().warning(
                "%s: %s from %s; retry %d of %d in %.1f s",
                spec.name,
                _describe(exc, config.download_timeout),
                url,
                attempt + 1,
                config.download_retries,
                delay,
            )
            time.sleep(delay)


def _fetch_from_mirrors(
    spec: DataFile, target: Path, config: PipelineConfig, unreachable: dict[str, str]
) -> str:
    """Fetch `spec` into `target` from the first mirror that serves the pinned bytes.

    Returns that mirror. `unreachable` (mirror -> reason) carries mirrors that could not be
    reached for an earlier file, so a dead mirror costs its timeouts and retries only once.
    """
    log = _logger()
    failures = []
    for mirror in config.mirrors:
        if mirror in unreachable:
            failures.append(f"{mirror} ({unreachable[mirror]})")
            continue
        scheme = urlparse(mirror).scheme
        try:
            _fetch_with_retries(urljoin(mirror, spec.name), spec, target, config)
        except (OSError, HTTPException, CorruptDataError) as exc:
            reason = _describe(exc, config.download_timeout)
            log.warning("%s: mirror %s failed: %s", spec.name, mirror, reason)
            failures.append(f"{mirror} ({reason})")
            if _unreachable(exc, scheme):
                unreachable[mirror] = reason
            continue
        log.info("%s: fetched from %s and verified", spec.name, mirror)
        return mirror
    hint = "" if (DEBIAN_DATA_DIR / spec.name).exists() else f"; {DEBIAN_HINT}"
    raise DatasetError(f"{spec.name}: every mirror failed: {'; '.join(failures)}{hint}")


# --- the step -------------------------------------------------------------------------------


def prepare_dataset(config: PipelineConfig) -> str:
    """Make the dataset cache complete and verified; return its file:// URI.

    Every cached file is hashed; a missing or damaged one is fetched from the mirrors in order
    (unless `config.offline`, where that is an error). One process at a time fills a cache (lock
    file); the others wait, then find it warm. The record (cache, per-file SHA-256, mirror) is
    rewritten only when it changes, so a warm cache keeps the mirrors that originally served it.
    """
    cache = _cache_path(config)
    if config.offline and not cache.is_dir():
        raise DatasetError(
            f"offline mode: dataset cache {cache} does not exist; run once without --offline "
            "to download the data set"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"dataset cache {cache}: cannot create it ({exc})") from exc
    log = _logger()
    with _cache_lock(cache):
        for stale in cache.glob(f".*{PART_SUFFIX}"):  # left by a killed process
            stale.unlink(missing_ok=True)
        old_record = _read_record_file(cache)
        problems = {
            spec.name: problem
            for spec in FILES.values()
            if (problem := _cache_problem(cache / spec.cached_name, spec)) is not None
        }
        if config.offline and problems:
            listed = "; ".join(f"{name} {problem}" for name, problem in problems.items())
            raise DatasetError(
                f"offline mode: dataset cache {cache} is not usable: {listed}; "
                "run without --offline to fetch it"
            )
        files = {}
        unreachable: dict[str, str] = {}
        for spec in FILES.values():
            if spec.name in problems:
                if problems[spec.name] != MISSING:
                    log.warning(
                        "%s: cached copy %s; fetching it again", spec.name, problems[spec.name]
                    )
                mirror = _fetch_from_mirrors(spec, cache / spec.cached_name, config, unreachable)
                files[spec.name] = {"sha256": spec.sha256, "mirror": mirror}
            else:
                kept = old_record.get("files", {}).get(spec.name, {})
                files[spec.name] = {
                    "sha256": spec.sha256,
                    "mirror": kept.get("mirror", UNKNOWN_MIRROR),
                }
        record = {"cache": str(cache), "files": files}
        if record != old_record:
            with _atomic_writer(cache / RECORD_NAME) as sink:
                sink.write(json.dumps(record, indent=2).encode())
    return cache.as_uri()


def _load_verified(path: Path, spec: DataFile) -> np.ndarray:
    """Read a cached IDX file once; hash and parse those same bytes."""
    try:
        with path.open("rb") as file:
            raw = bytearray(os.fstat(file.fileno()).st_size)
            file.readinto(raw)
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot read ({exc.strerror}); run `pipeline dataset` to fetch it"
        ) from exc
    array = parse_idx(raw, str(path), spec.shape)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise CorruptDataError(
            f"{path}: SHA-256 {digest[:16]}… does not match the pinned {spec.sha256[:16]}…; "
            "run `pipeline dataset` to fetch it again"
        )
    return array


def load_dataset(data_uri: str) -> FashionMNIST:
    """Load the four IDX files of a dataset cache as uint8 arrays, verifying each digest."""
    cache = _cache_dir(data_uri)
    return FashionMNIST(
        **{key: _load_verified(cache / spec.cached_name, spec) for key, spec in FILES.items()}
    )


def read_record(data_uri: str) -> dict:
    """The lineage record of a dataset cache: its location, and per file the SHA-256 and the
    mirror that served it."""
    path = _cache_dir(data_uri) / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot read the dataset record ({exc.strerror}); run `pipeline dataset`"
        ) from exc
    except ValueError as exc:
        raise DatasetError(f"{path}: not a valid dataset record ({exc})") from exc
