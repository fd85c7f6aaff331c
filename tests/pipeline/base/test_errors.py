"""pipeline/base/errors.py: the error a user can fix is one line; a permanent one is one too."""

from __future__ import annotations

import subprocess
import sys

from pipeline.base.errors import PermanentError, PipelineError
from tests.support import REPO


def test_a_permanent_error_is_a_pipeline_error() -> None:
    assert issubclass(PermanentError, PipelineError) and issubclass(PipelineError, Exception)


def test_the_cli_prints_a_pipeline_error_as_one_line_without_traceback() -> None:
    """A real `pipeline` process given an option it refuses (a PipelineError inside)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "artifacts",
            "--artifact-store",
            "ftp://x/y",
            "list",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
