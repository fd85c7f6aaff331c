"""pipeline/base/uris.py: what a store or data URI means on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.uris import local_path


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
