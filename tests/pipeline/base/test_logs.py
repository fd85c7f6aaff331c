"""pipeline/base/logs.py outside a Prefect run: the module's own logger, escaped; a rank or a
plain CLI call never imports Prefect for it (checked in a fresh process)."""

from __future__ import annotations

import logging
import subprocess
import sys

from pipeline.base.logs import in_prefect_run, step_logger
from pipeline.base.text import PRINTABLE_FILTER
from tests.support import REPO


def test_outside_a_run_the_step_logger_is_the_modules_own_and_escapes() -> None:
    logger = step_logger("tests.logs.step")
    assert logger is logging.getLogger("tests.logs.step")
    assert PRINTABLE_FILTER in logger.filters
    assert in_prefect_run() is False


def test_asking_for_a_step_logger_never_imports_prefect() -> None:
    code = (
        "import sys; from pipeline.base.logs import step_logger, in_prefect_run; "
        "step_logger('x').info('y'); print(in_prefect_run(), 'prefect' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.stdout.split() == ["False", "False"], result.stderr
