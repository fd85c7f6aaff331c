"""Fetching one file of the data set from an ordered list of mirrors (http, https, file).

Each download is inflated and hashed as it streams and renamed into the cache only when its
SHA-256 matches the pin; transient failures are retried with backoff, a dead mirror is skipped
for the rest of the run. A progress bar is drawn only on a terminal.
"""

from __future__ import annotations

import errno
import socket
import sys
import time
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin, urlparse
from urllib.request import urlopen

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PermanentError
from pipeline.base.files import atomic_writer
from pipeline.base.logs import step_logger
from pipeline.base.uris import to_uri
from tasks.dataset.idx import CorruptDataError, DataFile, DatasetError, inflate_gzip

CHUNK_BYTES = 1 << 20
# Where Debian's dataset-fashion-mnist package puts its copy (the last default mirror).
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_HINT = (
    "no local copy either: `apt-get install dataset-fashion-mnist` provides one at "
    f"{to_uri(DEBIAN_DATA_DIR, follow_links=False)}/ (a default mirror)"
)

# Errors of the local disk, never of a network: no mirror and no retry can make space.
LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_SECONDS = 0.5  # first retry delay; doubles per retry
BACKOFF_MAX_SECONDS = 10.0


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


class CacheWriteError(DatasetError, PermanentError):
    """The dataset cache cannot be written (disk full, quota, read-only): not the mirror's fault."""


def _download(url: str, spec: DataFile, target: Path, timeout: float) -> None:
    """Stream `url` (http, https or file) inflated into `target`, only if it is the pinned file."""
    try:
        _stream(url, spec, target, timeout)
    except OSError as exc:
        if exc.errno in LOCAL_DISK_ERRNOS:
            raise CacheWriteError(
                f"{spec.name}: cannot write the dataset cache {target.parent}: "
                f"{exc.strerror}; free space there or set --data-dir"
            ) from exc
        raise


def _stream(url: str, spec: DataFile, target: Path, timeout: float) -> None:
    # `timeout` bounds the connect and every read: a mirror that stalls mid-body raises.
    with (
        urlopen(url, timeout=timeout) as response,
        atomic_writer(target, layout.DATASET_PART_SUFFIX) as sink,
    ):
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
            step_logger(__name__).warning(
                "%s: %s from %s; retry %d of %d in %.1f s",
                spec.name,
                _describe(exc, config.download_timeout),
                url,
                attempt + 1,
                config.download_retries,
                delay,
            )
            time.sleep(delay)


def fetch_from_mirrors(
    spec: DataFile, target: Path, config: PipelineConfig, unreachable: dict[str, str]
) -> str:
    """Fetch `spec` into `target` from the first mirror that serves the pinned bytes.

    Returns that mirror. `unreachable` (mirror -> reason) carries mirrors that could not be
    reached for an earlier file, so a dead mirror costs its timeouts and retries only once.
    """
    log = step_logger(__name__)
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
