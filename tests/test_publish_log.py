# ruff: noqa: F811 (the fixtures imported from test_publish are used as arguments)
"""Issue 22, item 7: the publish step's log line says what latest.json does once, in plain
words, for a real publish to a file:// store (promoted, already latest, refused)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from tests.support.steps import published
from tests.test_publish import T0, dataset_uri, make_run_dir, with_run  # noqa: F401


def published_line(config: PipelineConfig, data_uri: str, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tasks.publish.step"):
        published(config, data_uri, config.run_dir().resolve().as_uri())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("published")]
    return line


def test_the_publish_line_says_what_latest_does_once(
    tmp_path: Path, dataset_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PipelineConfig(artifact_store=(tmp_path / "store").as_uri(), work_dir=tmp_path / "w")
    good = with_run(store, "run-good")
    make_run_dir(good, created=T0)
    first = published_line(good, dataset_uri, caplog)
    assert first.endswith("object(s) uploaded); latest.json points at it (promotion 1)"), first
    again = published_line(good, dataset_uri, caplog)
    assert again.endswith("(0 object(s) uploaded); latest.json already points at it"), again
    low = with_run(store, "run-low")
    make_run_dir(low, created=T0 + 1, accuracy=0.5, passed=False)
    refused = published_line(low, dataset_uri, caplog)
    assert refused.endswith("latest.json unchanged: run run-low did not pass the quality gate")
    for line in (first, again, refused):
        assert line.count("latest.json") == 1, line
