"""pipeline/preflight.py: a store that cannot be written fails at once, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.preflight import preflight


def test_a_writable_file_store_passes(tmp_path: Path) -> None:
    preflight(PipelineConfig(artifact_store=(tmp_path / "store").as_uri()))


def test_a_store_under_a_regular_file_is_one_clear_error(tmp_path: Path) -> None:
    """Caused for real for root too: no directory can be made under a file."""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PipelineError, match="file"):
        preflight(PipelineConfig(artifact_store=(tmp_path / "file" / "store").as_uri()))
