"""`file://artifacts`, the default store, is `./artifacts`: the flow's steps, `evaluate`,
`predict` and `artifacts` all read `file://artifacts/runs/ID` as that directory (before the
redesign, evaluate read it as `/runs/ID`). Options may follow the action on every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO

pytestmark = pytest.mark.integration  # `pipeline` subprocesses that train

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
TIMEOUT_S = 300


def pipeline(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")},
        "PIPELINE_MIRRORS": f'["{DEBIAN_MIRROR}"]',
        "PIPELINE_DATA_DIR": str(cwd / "data"),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [*PIPELINE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 1-epoch run, published by the steps to the default store file://artifacts."""
    cwd = tmp_path_factory.mktemp("relative")
    ok(pipeline(cwd, "step", "dataset"))
    run = ("--run-id", "R1", "--epochs", "1", "--min-test-accuracy", "0.5")
    ok(pipeline(cwd, "step", "train", *run))
    ok(pipeline(cwd, "step", "evaluate", *run))
    published_uri = ok(pipeline(cwd, "step", "publish", *run)).strip().splitlines()[-1]
    assert published_uri == (cwd / "artifacts" / "runs" / "R1").as_uri()
    return cwd


def test_evaluate_reads_the_relative_store_uri(published: Path) -> None:
    model = ("--model", "file://artifacts/runs/R1", "--min-test-accuracy", "0.5")
    out = ok(pipeline(published, "evaluate", *model))
    assert "accuracy 0." in out
    assert (published / "work" / "evaluations" / "R1" / "report.md").is_file()


def test_predict_reads_the_relative_store_uri(published: Path) -> None:
    image = published / "dark.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    out = ok(pipeline(published, "predict", "--model", "file://artifacts/runs/R1", str(image)))
    assert out.startswith("dark.png")


@pytest.mark.parametrize("place", ["before", "after"])
def test_artifacts_options_before_or_after_the_action(published: Path, place: str) -> None:
    store = ("--artifact-store", "file://artifacts")
    for action in (("list",), ("show", "R1"), ("verify", "R1")):
        args = [*store, *action] if place == "before" else [*action, *store]
        out = ok(pipeline(published, "artifacts", *args))
        assert "R1" in out
    # The URI is relative to the working directory: elsewhere the same store is empty.
    args = [*store, "list"] if place == "before" else ["list", *store]
    assert "no complete runs" in ok(pipeline(published.parent, "artifacts", *args))


def test_an_option_after_the_arguments_is_used(published: Path) -> None:
    result = pipeline(published, "artifacts", "verify", "R1", "--artifact-store", "file://nowhere")
    assert result.returncode == 1
    assert "error: run 'R1' is not in" in result.stderr and "nowhere" in result.stderr
