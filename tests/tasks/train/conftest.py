"""Trainings the train tests share (real Fashion-MNIST, real horovodrun), once a session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.steps import trained
from tests.support.train import Capture, run_config


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def np1_run(work_dir: Path, data_uri: str) -> Path:
    return trained(run_config(work_dir, "np1", num_proc=1, epochs=2), data_uri)


@pytest.fixture(scope="session")
def np2_run(work_dir: Path, data_uri: str) -> tuple[Path, list[str]]:
    """Two epochs at two ranks, with the launcher's log lines (no Prefect context here)."""
    capture = Capture()
    logger = logging.getLogger("tasks.train")
    logger.addHandler(capture)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        uri = trained(run_config(work_dir, "np2", num_proc=2, epochs=2), data_uri)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
    return uri, capture.messages


@pytest.fixture(scope="session")
def np2_again(work_dir: Path, data_uri: str) -> Path:
    return trained(run_config(work_dir, "np2-again", num_proc=2, epochs=2), data_uri)


@pytest.fixture(scope="session")
def five_epochs(work_dir: Path, data_uri: str) -> Path:
    """The seed's full recipe (5 epochs) at two ranks, uninterrupted."""
    return trained(run_config(work_dir, "five", num_proc=2, epochs=5), data_uri)
