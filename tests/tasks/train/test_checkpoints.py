"""tasks/train/checkpoints.py: the pointer to the last complete checkpoint and the files it
names, on a real run directory, without a training (real NDArray-headed files; the tampering
of a trained run's checkpoint is in tests/system/test_train_faults.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.layout import CHECKPOINT_POINTER
from tasks.train.checkpoints import (
    MAX_POINTER_BYTES,
    checkpoint_dir,
    file_problem,
    file_sha256,
    read_checkpoint,
    stem,
    verify_files,
)
from tests.support.checkpoints import write_epoch


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def config() -> PipelineConfig:
    return PipelineConfig(run_id="run", epochs=5)


def test_no_pointer_is_no_checkpoint(run_dir: Path) -> None:
    assert read_checkpoint(run_dir) is None


def test_the_pointer_reads_back_and_keeps_only_the_files_it_names(run_dir: Path) -> None:
    for epoch in (1, 2, 3):
        write_epoch(run_dir, epoch, config())
    written = write_epoch(run_dir, 4, config())  # its best epoch is 3: kept, 1 and 2 are not
    assert read_checkpoint(run_dir) == written
    kept = sorted(p.name for p in checkpoint_dir(run_dir).glob("epoch-*"))
    assert kept == sorted(written.files()) and f"{stem(1)}.params" not in kept
    verify_files(run_dir, written)


def test_a_file_changed_after_the_pointer_is_refused_naming_it(run_dir: Path) -> None:
    written = write_epoch(run_dir, 2, config())
    params = checkpoint_dir(run_dir) / written.params
    params.write_bytes(params.read_bytes() + b"\x00")
    with pytest.raises(ConfigError, match=rf"{params.name} does not match the SHA-256"):
        verify_files(run_dir, written)


def test_only_an_ndarray_file_with_its_digest_is_a_checkpoint_file(tmp_path: Path) -> None:
    pickle = tmp_path / "pickle"
    pickle.write_bytes(b"\x80\x04K\x01.")
    assert "not an MXNet NDArray file" in file_problem(pickle, file_sha256(pickle))
    assert file_problem(tmp_path / "missing", "0" * 64) == "is missing"
    os.symlink(pickle, tmp_path / "link")
    assert "symlink is never followed" in file_problem(tmp_path / "link", file_sha256(pickle))


@pytest.mark.parametrize(
    ("pointer", "reason"),
    [
        ("{not json", "not a valid checkpoint pointer"),
        ("x" * (MAX_POINTER_BYTES + 1), "bytes, more than"),
    ],
)
def test_a_bad_pointer_is_one_config_error(run_dir: Path, pointer: str, reason: str) -> None:
    (run_dir / CHECKPOINT_POINTER).parent.mkdir(parents=True)
    (run_dir / CHECKPOINT_POINTER).write_text(pointer)
    with pytest.raises(ConfigError, match=reason):
        read_checkpoint(run_dir)
