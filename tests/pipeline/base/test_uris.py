"""pipeline/base/uris.py: what a store or data URI means on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.store import FileStore
from pipeline.base.uris import local_path, to_uri


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("file://artifacts/runs/R1", Path("artifacts/runs/R1")),  # the default store's form
        ("file:///abs/runs/R1", Path("/abs/runs/R1")),
        ("file://localhost/abs/R1", Path("/abs/R1")),
        ("artifacts/runs/R1", Path("artifacts/runs/R1")),
        ("file:///with%20space/R1", Path("/with space/R1")),
    ],
)
def test_one_meaning_of_a_file_uri(uri: str, path: Path) -> None:
    assert local_path(uri) == path


def test_to_uri_is_the_inverse_of_local_path_and_follows_links_only_when_asked(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real dir"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert to_uri(link) == real.resolve().as_uri()
    assert to_uri(link, follow_links=False) == link.absolute().as_uri()
    assert local_path(to_uri(real)) == real.resolve()
    assert FileStore(link).uri == link.absolute().as_uri()  # a store is named as it was given
