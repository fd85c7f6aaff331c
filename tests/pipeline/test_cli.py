"""The CLI's contract with a person: help that teaches, one-line errors, non-zero exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.cli import build_parser
from tests.support import REPO

PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def run_cli(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    return subprocess.run(
        [*PIPELINE, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], result.stderr


def test_every_config_field_is_a_flag_of_run_with_its_description():
    assert "pipeline run" in build_parser().format_help()
    run_help = subprocess.run([*PIPELINE, "run", "--help"], capture_output=True, text=True)
    assert run_help.returncode == 0
    normalized = " ".join(run_help.stdout.split())
    for name, info in PipelineConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in normalized, name
        assert f"PIPELINE_{name.upper()}" in normalized, name
        assert " ".join(info.description.split()[:4]) in normalized, name


def test_flags_and_environment_build_one_config(monkeypatch):
    monkeypatch.setenv("PIPELINE_EPOCHS", "3")
    monkeypatch.setenv("PIPELINE_LR", "0.5")
    args = build_parser().parse_args(["run", "--lr", "0.2", "--num-proc", "2"])
    from pipeline.commands import config_from as _config_from

    config = _config_from(args)
    assert (config.epochs, config.lr, config.num_proc, config.batch_size) == (3, 0.2, 2, 256)


def test_unknown_flag(tmp_path):
    result = run_cli("run", "--epoks", "1", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --epoks" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--epochs", "-1"], "--epochs: Input should be greater than or equal to 1"),
        (["--lr", "0"], "--lr: Input should be greater than 0"),
        (["--batch-size", "0"], "--batch-size"),
        (["--num-proc", "4", "--batch-size", "2"], "num_proc=4 is larger than batch_size=2"),
        (["--hosts", "node1;node2"], "not Horovod host syntax"),
        (["--artifact-store", "ftp://host/x"], "unsupported scheme 'ftp'"),
        (["--mirrors", "gopher://x/"], "unsupported scheme 'gopher'"),
    ],
)
def test_bad_config_is_one_line_error_before_any_work(tmp_path, args, fragment):
    result = run_cli("run", *args, tmp_path=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "work").exists(), "nothing may start before the config is valid"


def test_bad_environment_variable_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_EPOCHS", "many")
    result = run_cli("run", tmp_path=tmp_path)
    assert_one_line_error(result, "--epochs")


def test_unwritable_artifact_store_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # Root ignores permission bits, so make the store path unwritable for everyone: it lies
    # below a regular file.
    result = run_cli(
        "run", "--artifact-store", f"file://{blocker}/store", "--epochs", "1", tmp_path=tmp_path
    )
    assert_one_line_error(result, str(blocker))
    assert not (tmp_path / "work").exists()


def test_the_readme_documents_every_option():
    readme = (REPO / "README.md").read_text()
    for name in PipelineConfig.model_fields:
        assert f"`PIPELINE_{name.upper()}`" in readme, f"README's configuration table lacks {name}"
