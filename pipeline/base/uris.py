"""URIs of local things: the one place a `file://` URI (or a plain path) becomes a path, and
the one place a path becomes a `file://` URI (`to_uri`).

The project's default store is `file://artifacts`, i.e. `./artifacts`: in `file://NAME/...`
a host-like first part is the first path component relative to the working directory (as the
store always read it), `file:///abs/path` is absolute and `file://localhost/abs` is RFC 8089's
absolute form. Every module that turns a URI into a path calls `local_path`, so evaluate,
predict, the artifact browser and the flow agree on what `file://artifacts/runs/R1` means.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.base.errors import PipelineError


class URIError(PipelineError, ValueError):
    """A URI that cannot name a local file or directory."""


def is_local(uri: str) -> bool:
    """Whether `uri` is a plain path or a file:// URI."""
    return urlparse(uri).scheme in ("", "file") or _is_windows_drive(uri)


def _is_windows_drive(uri: str) -> bool:
    return len(uri) > 1 and uri[1] == ":" and uri[0].isalpha()


def local_path(uri: str) -> Path:
    """The path a plain path or file:// URI names (relative ones stay relative)."""
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Path(uri).expanduser()
    if parsed.scheme != "file":
        raise URIError(f"{uri}: not a local path or file:// URI (scheme {parsed.scheme!r})")
    if parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    return Path(unquote(parsed.netloc + parsed.path))


def to_uri(path: Path | str, *, follow_links: bool = True) -> str:
    """The absolute file:// URI of a local path (`~` expanded): the one path -> URI.

    follow_links: resolve symbolic links (the steps' URIs name the real directory); False
    keeps the path as given, only made absolute (a store's root is named as the user named it).
    """
    path = Path(path).expanduser()
    return (path.resolve() if follow_links else path.absolute()).as_uri()


STORE_SCHEMES = ("file", "s3")


def check_store_uri(uri: str, error: type[Exception] = URIError) -> str:
    """The scheme of an artifact store URI; raises `error` with the reason when it cannot be one."""
    parsed = urlparse(uri)
    if parsed.scheme not in STORE_SCHEMES:
        raise error(
            f"artifact store {uri!r} has unsupported scheme {parsed.scheme!r}; "
            "use file://PATH or s3://BUCKET/PREFIX"
        )
    if parsed.scheme == "s3" and not parsed.netloc:
        raise error(f"artifact store {uri!r} names no bucket; use s3://BUCKET/PREFIX")
    return parsed.scheme
