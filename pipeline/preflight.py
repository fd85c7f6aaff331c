"""Checks that fail in seconds what would otherwise fail late: before Prefect starts, before the
dataset and an hour of training, not at publish. No Prefect here: `pipeline run` calls it before
it pays for importing Prefect, so a bad store is one error line at once."""

from __future__ import annotations

import functools

from pipeline.base.config import PipelineConfig
from pipeline.base.store import open_store


def preflight(config: PipelineConfig) -> None:
    """Fail now on what would fail late. The CLI calls it before the flow run; the flow calls it
    for deployment runs; a store checked once in a process is not checked again."""
    _ensure_writable(config.artifact_store, **config.store_options())


@functools.cache
def _ensure_writable(uri: str, **options: object) -> None:
    open_store(uri, **options).ensure_writable()
