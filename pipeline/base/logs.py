"""The one step logger: the Prefect run's logger inside a flow or task run (its lines reach the
UI), else the module's own logger. Prefect is asked only when it is already loaded: a rank or a
plain CLI call never pays for importing it."""

from __future__ import annotations

import logging
import sys

from pipeline.base.text import escape_logger


def step_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """The logger for a step's messages; each message has its control characters escaped
    (a step logs names and values read from stores, run directories and data files)."""
    if "prefect" in sys.modules:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            adapter = get_run_logger()
            escape_logger(adapter.logger)
            return adapter
        except MissingContextError:
            pass
    return escape_logger(logging.getLogger(name))


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
